"""examples/linfusion_highres.py and examples/linfusion_distill.py end to end in --tiny mode, in a
subprocess (random weights: files, sizes, the printed per-stage table, a checkpoint that loads)."""
from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "linfusion_highres.py")
# The --tiny --cascade defaults: 128x256 (height x width) from a base of 8x16, strengths 0.4/0.3/0.2/0.1 of 10 steps.
TINY_CASCADE = [(8, 16, None, 10), (16, 32, 0.4, 4), (32, 64, 0.3, 3), (64, 128, 0.2, 2), (128, 256, 0.1, 1)]
ROW = re.compile(r"^\s+(\d+)\s+(\d+)x(\d+)\s+(t2i|[\d.]+)\s+(.*)$")


def _run(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, EXAMPLE, *args], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout


def _size(path):
    with Image.open(path) as image:
        return image.size, image.mode


def _table(stdout, title):
    """The rows (stage, width, height, strength, rest) of the table printed under `title`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 2  # title, header
    rows = []
    for line in lines[start:]:
        match = ROW.match(line)
        if match is None:
            break
        index, width, height, strength, rest = match.groups()
        rows.append((int(index), int(width), int(height), None if strength == "t2i" else float(strength), rest.split()))
    return rows


def test_tiny_single_stage(tmp_path):
    out = tmp_path / "tiny.png"
    stdout = _run(tmp_path, "--tiny", "--device", "cpu", "--output", str(out))
    assert _size(out) == ((16, 16), "RGB")  # the tiny UNet's native 8x8 latents
    assert "16x16 image in" in stdout and "cascade" not in stdout
    assert sorted(os.listdir(tmp_path)) == ["tiny.png"]


def test_tiny_cascade_save_stages(tmp_path):
    out = tmp_path / "cascade.png"
    stdout = _run(tmp_path, "--tiny", "--cascade", "--save-stages", "--device", "cpu", "--out", str(out))
    assert _size(out) == ((256, 128), "RGB")
    for index, (height, width, _, _) in enumerate(TINY_CASCADE):
        assert _size(tmp_path / f"cascade_stage{index}.png") == ((width, height), "RGB")
    assert sorted(os.listdir(tmp_path)) == ["cascade.png"] + [f"cascade_stage{i}.png" for i in range(len(TINY_CASCADE))]

    predicted = _table(stdout, "memory model, predicted per stage")
    measured = _table(stdout, "cascade stages, measured")
    expected = [(i, w, h, s) for i, (h, w, s, _) in enumerate(TINY_CASCADE)]
    assert [row[:4] for row in predicted] == expected
    assert [row[:4] for row in measured] == expected
    for row, (_, _, _, steps) in zip(measured, TINY_CASCADE):
        denoising, seconds = int(row[4][0]), float(row[4][1])
        assert denoising == steps and seconds > 0
        # peak, predicted, stage peak, predicted: a number and a unit each (measured on Linux: not n/a)
        assert len(row[4]) == 10 and all(unit in ("MiB", "GiB") for unit in row[4][3::2]), row
    assert "256x128 image in" in stdout


def test_tiny_cascade_plan_only_prints_the_plan_and_writes_nothing(tmp_path):
    """--plan-only: the pipeline built without weights, the budget's plan printed for a GPU that
    need not be here (--device cuda: its bf16 for --tiny), no image and no cascade run."""
    stdout = _run(tmp_path, "--tiny", "--cascade", "--plan-only", "--device", "cuda", "--memory-budget-gb", "0.02")
    predicted = _table(stdout, "memory model, predicted per stage")
    assert [row[:4] for row in predicted] == [(i, w, h, s) for i, (h, w, s, _) in enumerate(TINY_CASCADE)]
    assert predicted[0][4][-2:] == ["unchunked,", "untiled"] and "cfg_batch=1" in predicted[-1][4]
    assert "cascade stages, measured" not in stdout and os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def example():
    return runpy.run_path(EXAMPLE, run_name="linfusion_highres_example")


@pytest.mark.parametrize("args, message", [
    (["--tiny", "--strengths", "0.4"], "needs --cascade"),
    (["--tiny", "--save-stages"], "needs --cascade"),
    (["--tiny", "--plan-only"], "needs --cascade"),
    (["--tiny", "--cascade", "--plan-only", "--device", "meta"], "--plan-only plans for cpu or cuda"),
    (["--tiny", "--cascade", "--memory-budget-gb", "80", "--ff-chunk", "4096"], "drop --ff-chunk"),
    (["--tiny", "--cascade", "--memory-budget-gb", "80", "--token-chunk", "4096"], "drop --token-chunk"),
    (["--tiny", "--cascade", "--vae-tile", "64"], "--vae-tile needs --vae-tiling"),
    (["--tiny", "--cascade", "--steps", "4"], "use --steps >= 10"),
    (["--tiny", "--cascade", "--strengths", "0.4,1.5"], "strengths in (0, 1]"),
    # sizes the arguments alone rule out, refused before a pipeline loads
    (["--tiny", "--cascade", "--height", "100", "--width", "200"],
     "height x width 100x200 halved 4 times gives 6x12 (stage 6x12 fails): pick --height and --width divisible by 128"),
    (["--tiny", "--cascade", "--width", "200"], "height x width 200x200 halved 4 times"),  # one side: a square
    (["--tiny", "--cascade", "--base-size", "20"], "pick --base-size a multiple of 8"),
    (["--tiny", "--cascade", "--height", "512", "--base-size", "64"], "512 / 2**4 = 32 px, not --base-size=64"),
])
def test_clear_errors(example, capsys, args, message):
    with pytest.raises(SystemExit) as error:
        example["parse_args"](args)
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_memory_arguments(example):
    parse, memory_options = example["parse_args"], example["memory_options"]
    args = parse(["--tiny", "--cascade", "--cfg-batch-size", "1", "--ff-chunk", "4096", "--vae-tiling", "exact",
                  "--vae-tile", "32"])
    options, budget = memory_options(args)
    assert budget is None
    assert (options.cfg_batch_size, options.token_chunk_size, options.ff_chunk_size) == (1, 65536, 4096)
    assert (options.vae_tiling, options.vae_tile_size) == ("exact", 32)
    assert args.strengths == (0.4, 0.3, 0.2, 0.1) and args.steps == 10
    options, budget = memory_options(parse(["--tiny", "--cascade", "--memory-budget-gb", "1.5"]))
    assert options is None and budget == int(1.5 * 2**30)
    options, _ = memory_options(parse(["--tiny", "--cascade", "--token-chunk", "0"]))
    assert options.token_chunk_size is None


DISTILL_EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "linfusion_distill.py")


@pytest.mark.parametrize("output_flag", ["--output", "--save"])  # --save: the old name, kept as an alias
def test_distill_tiny_writes_a_loadable_checkpoint(tmp_path, output_flag):
    """examples/linfusion_distill.py --tiny: the loss falls (the example exits 1 otherwise) and the
    checkpoint it writes loads with LinFusion.from_pretrained, one module per attn1 layer."""
    from mmfast.models.linfusion import LinFusion

    checkpoint = tmp_path / "linfusion"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, DISTILL_EXAMPLE, "--tiny", "--steps", "12", output_flag,
                                str(checkpoint)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    layers = int(re.search(r"LinFusion: (\d+) attn1 layers", completed.stdout).group(1))
    assert f"saved LinFusion checkpoint to {checkpoint}" in completed.stdout
    loaded = LinFusion.from_pretrained(str(checkpoint))
    assert layers > 0 and len(loaded.specs) == layers
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_distill_tiny_without_the_denoising_term_brings_the_student_to_its_teacher(tmp_path):
    """--no-denoise (target=None): the teacher and attn1 terms alone, each must fall (the example
    exits 1 otherwise); no denoise column is printed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, DISTILL_EXAMPLE, "--tiny", "--steps", "12", "--no-denoise"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    terms = re.search(r"per term: teacher ([\d.]+) -> ([\d.]+), attn1 ([\d.]+) -> ([\d.]+)", completed.stdout)
    assert terms, completed.stdout[-2000:]
    teacher_first, teacher_last, attn1_first, attn1_last = map(float, terms.groups())
    assert teacher_last < teacher_first and attn1_last < attn1_first
    assert "denoise" not in completed.stdout


def test_distill_an_sdxl_unet_from_a_folder(tmp_path):
    """--unet DIR with SD-XL's UNet (--mid-dim-scale 16, as the help says) crashed: the example
    never passed the UNet's added conditions (text_embeds, time_ids)."""
    from mmfast.testing.tiny_diffusers import tiny_sdxl_pipeline

    tiny_sdxl_pipeline(seed=0).unet.save_pretrained(tmp_path / "unet")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, DISTILL_EXAMPLE, "--unet", str(tmp_path / "unet"), "--mid-dim-scale",
                                "16", "--steps", "2", "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert re.search(r"mean loss of the first 1 step [\d.]+ -> last 1 step [\d.]+", completed.stdout), completed.stdout
