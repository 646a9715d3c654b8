"""The examples' command lines refuse ordinary mistakes before any work, with one argparse
error line (exit status 2) that names the flag, instead of a traceback after the run; and
mmfast.cli, the helpers they share."""
from __future__ import annotations

import argparse
import os
import runpy
import sys

import pytest
import torch

from mmfast import cli

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("PIL")

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
NO_GPU = "cpu" if torch.cuda.is_available() else "cuda"  # a device this machine lacks: "cuda" without a GPU


def _parse(example, argv, monkeypatch):
    """parse_args of examples/<example>.py on argv (its own sys.argv when it takes none)."""
    functions = runpy.run_path(os.path.join(EXAMPLES, f"{example}.py"), run_name=f"{example}_under_test")
    monkeypatch.setattr(sys, "argv", [f"{example}.py", *argv])
    parse = functions["parse_args"]
    return parse(argv) if parse.__code__.co_argcount else parse()


CASES = [
    ("linfusion_highres", ["--tiny", "--output", "{tmp}"], "is a folder; give an image file name"),
    ("linfusion_highres", ["--tiny", "--output", "{tmp}/no_extension"], "the extension says which image format"),
    ("linfusion_highres", ["--pipeline", "{tmp}/missing"], "--pipeline '{tmp}/missing' is not a directory"),
    ("linfusion_highres", ["--tiny", "--steps", "0"], "--steps must be > 0"),
    ("linfusion_highres", ["--tiny", "--height", "100", "--width", "72"], "--height 100: must be a multiple of 8"),
    ("linfusion_distill", ["--tiny", "--steps", "0"], "--steps must be > 0"),
    ("linfusion_distill", ["--unet", "{tmp}/missing"], "--unet '{tmp}/missing' is not a directory (nothing is "),
    ("linfusion_distill", ["--tiny", "--output", "{tmp}/a_file"], "is a file; give a folder"),
    ("liquid_generate", ["--tiny", "--top-p", "1.5"], "0 <= top_p <= 1"),
    ("liquid_generate", ["--tiny", "--image-tokens", "99"], "image_tokens must be a positive square number"),
    ("liquid_generate", ["--tiny", "--num-images", "0"], "num_images must be >= 1"),
    ("liquid_generate", ["--model", "{tmp}/missing", "--vqgan", "{tmp}/missing"], "--model '{tmp}/missing' is not"),
    ("liquid_generate", ["--tiny", "--backend", "foo"], "invalid choice: 'foo'"),
    ("liquid_generate", ["--tiny", "--device", NO_GPU], f"--device {NO_GPU}"),
    ("vq_tokenize", ["--tiny", "--input", "{tmp}/missing.jpg"], "--input '{tmp}/missing.jpg' is not a file"),
    ("linfusion_distill", ["--tiny", "--batch", "0"], "--batch-size must be > 0"),  # --batch: the old name
    ("vq_tokenize", ["--tiny", "--output", "{tmp}/a_file"], "is a file; give a folder"),
    ("vq_tokenize", ["--tiny", "--resolution", "0"], "--resolution must be > 0"),
    ("vq_tokenize", ["--tiny", "--resolution", "129"], "must be a multiple of the VQGAN's downsampling factor 2"),
    ("vq_tokenize", ["--checkpoint", "{tmp}/a_file", "--resolution", "520"], "downsampling factor 16 (e.g. 512)"),
    ("aptp_mixed_batch", ["--tiny", "--batch", "2", "--codes", "0", "9"], "--codes must be in [0, 4) for 4 experts"),
    ("aptp_mixed_batch", ["--tiny", "--batch", "2", "--codes", "0"], "1 codes for --batch 2"),
    ("aptp_mixed_batch", ["--experts", "{tmp}/missing"], "--experts '{tmp}/missing' is not a directory"),
    ("aptp_mixed_batch", ["--experts", "{tmp}", "--save-tiny", "{tmp}/x"], "--save-tiny: go with --tiny, not --experts"),
    # options a source ignores are refused, not silently dropped (found by a new-user trial)
    ("aptp_mixed_batch", ["--experts", "{tmp}", "--num-codes", "0"], "--num-codes: go with --tiny, not --experts"),
    ("aptp_mixed_batch", ["--tiny", "--base-config", "{tmp}/missing"], "--base-config: goes with --experts"),
    ("liquid_generate", ["--tiny", "--vqgan", "{tmp}/a_file", "--vqgan-config", "chameleon"],
     "--vqgan, --vqgan-config: go with --model"),
    ("vq_tokenize", ["--tiny", "--config", "chameleon"], "--config: goes with --checkpoint"),
    ("aptp_mixed_batch", ["--tiny", "--plan-budget-mb", "-1"], "--plan-budget-mb must be >= 0 MiB, got -1"),
    ("diffdis_segment", ["--tiny", "--batch-size", "0"], "--batch-size must be > 0"),
    ("linfusion_highres", ["--pipeline", "{tmp}"], "--pipeline needs --linfusion DIR"),
    ("vq_tokenize", ["--checkpoint", "{tmp}/missing"], "--checkpoint '{tmp}/missing' does not exist"),
    ("diffdis_segment", ["--tiny", "--output", "{tmp}/a_file"], "is a file; give a folder"),
    ("liquid_generate", ["--model", "{tmp}", "--vqgan", "{tmp}/a_file"], "holds no tokenizer (tokenizer.json"),
]


@pytest.mark.parametrize("example, argv, message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_examples_refuse_bad_arguments_up_front(example, argv, message, tmp_path, monkeypatch, capsys):
    if NO_GPU == "cpu" and "--device" in argv:
        pytest.skip("needs a machine without a GPU")
    (tmp_path / "a_file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        _parse(example, argv, monkeypatch)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and message.replace("{tmp}", str(tmp_path)) in error, error
    assert "Traceback" not in error


def test_check_output_accepts_creatable_paths_and_creates_nothing(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    folder = str(tmp_path / "new" / "folder")
    assert cli.check_output(parser, folder, kind="folder") == folder
    assert cli.check_output(parser, str(tmp_path / "images" / "out.png"), kind="image")
    assert os.listdir(tmp_path) == []  # checked, not made: the examples make them when they write
    assert cli.check_output(parser, None, kind="folder") is None  # no --output: nothing to check
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli.check_output(parser, "~/out", kind="folder") == str(tmp_path / "out")


@pytest.mark.parametrize("output, kind, message", [
    ("{tmp}/a_file/sub", "folder", "is a file, so no folder can be made there"),
    ("{tmp}/a_file/sub/x.png", "image", "is a file, so no folder can be made there"),
    ("", "folder", "--output is empty"),
    ("{tmp}/x.unknown", "image", "the extension says which image format"),
])
def test_check_output_refuses(output, kind, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit):
        cli.check_output(argparse.ArgumentParser(), output.replace("{tmp}", str(tmp_path)), kind=kind)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_check_output_refuses_where_no_folder_can_be_made_even_as_root(capsys):
    """Found by a new-user trial: as root os.access said /proc was writable, so a cascade ran all
    its stages and only then failed to make its output folder."""
    with pytest.raises(SystemExit):
        cli.check_output(argparse.ArgumentParser(), "/proc/forbidden/x.png", kind="image")
    error = capsys.readouterr().err
    assert "no folder can be made in '/proc'" in error or "'/proc' is not writable" in error, error  # root / not


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_refuses_an_unwritable_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SystemExit):
        cli.check_output(argparse.ArgumentParser(), str(locked / "out"), kind="folder")
    assert "is not writable" in capsys.readouterr().err


def test_check_device_parses_and_refuses(capsys):
    parser = argparse.ArgumentParser(prog="example")
    assert cli.check_device(parser, "cpu") == torch.device("cpu")
    with pytest.raises(SystemExit):
        cli.check_device(parser, "not-a-device")
    assert "--device 'not-a-device'" in capsys.readouterr().err
    if not torch.backends.mps.is_available():  # a backend torch knows but this machine lacks
        with pytest.raises(SystemExit):
            cli.check_device(parser, "mps")
        assert "--device mps: torch cannot place a tensor there" in capsys.readouterr().err


def test_check_device_refuses_meta_and_a_backend_that_cannot_run_there(capsys, monkeypatch):
    """Found by a new-user trial: --device meta and --backend triton on the CPU (without Triton's
    interpreter) ended in tracebacks after the model was built."""
    parser = argparse.ArgumentParser(prog="example")
    with pytest.raises(SystemExit):
        cli.check_device(parser, "meta")
    assert "--device meta: meta tensors hold no data" in capsys.readouterr().err
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit):
        cli.check_device(parser, "cpu", "triton")
    assert "--backend triton" in capsys.readouterr().err
    assert cli.check_device(parser, "cpu", "native") == torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    assert cli.check_device(parser, "cpu", "triton") == torch.device("cpu")


def test_linfusion_highres_one_side_gives_a_square(monkeypatch):
    """Found by a new-user trial: --height alone ran at the pipeline's default size (diffusers drops
    a lone side) without --cascade, and as a square with it."""
    args = _parse("linfusion_highres", ["--tiny", "--height", "64"], monkeypatch)
    assert (args.height, args.width) == (64, 64)


def test_vq_tokenize_resolution_defaults_to_the_model_size(tmp_path, monkeypatch):
    """Found by a new-user trial: --config tiny with a checkpoint kept the 512 px default, whose
    attention over a 256 x 256 latent (the tiny VQGAN downsamples by 2) took the machine's memory."""
    (tmp_path / "vqgan.safetensors").write_text("checked for existence only")
    checkpoint = str(tmp_path / "vqgan.safetensors")
    assert _parse("vq_tokenize", ["--checkpoint", checkpoint, "--config", "tiny"], monkeypatch).resolution == 128
    assert _parse("vq_tokenize", ["--checkpoint", checkpoint], monkeypatch).resolution == 512
    assert _parse("vq_tokenize", ["--tiny"], monkeypatch).resolution == 128


def test_added_arguments_and_defaults():
    parser = argparse.ArgumentParser()
    cli.add_device_arguments(parser, default="cpu")
    cli.add_output_argument(parser, "out", kind="folder", what="where")
    args = parser.parse_args(["--backend", "reference", "--out", "elsewhere"])  # --out: the old name
    assert (args.device, args.backend, args.output) == ("cpu", "reference", "elsewhere")
    assert parser.parse_args([]).output == "out" and parser.parse_args([]).backend is None


def _readme_try_it_commands():
    """(example, argv) of each command in the README's "Try it" block."""
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")) as f:
        readme = f.read()
    block = readme.split("## Try it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.strip().splitlines():
        words = line.split("#", 1)[0].split()
        assert words[:1] == ["python"] and words[1].startswith("examples/"), line
        commands.append((os.path.basename(words[1])[:-3], words[2:]))
    return commands


def test_readme_try_it_commands_parse(tmp_path, monkeypatch):
    """Every example the README's "Try it" block lists exists and accepts the arguments shown."""
    commands = _readme_try_it_commands()
    assert {name for name, _ in commands} == {f[:-3] for f in os.listdir(EXAMPLES) if f.endswith(".py")}
    monkeypatch.chdir(tmp_path)  # the output folders the checks create
    for example, argv in commands:
        args = _parse(example, argv, monkeypatch)
        assert args.tiny, (example, argv)


def test_given_options_sees_what_the_command_line_set(capsys):
    """cli.given_options tells given options from defaults for every kind of action; refuse_options
    names them by their flag (found by a review: append / count actions crashed, and a flag whose
    dest differs was named by its dest)."""
    import argparse

    from mmfast import cli

    parser = argparse.ArgumentParser(prog="example")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--save", dest="output")
    parser.add_argument("--tag", action="append")
    parser.add_argument("-v", action="count")
    parser.add_argument("--num-codes", type=int, default=4)
    parser.add_argument("--xs", nargs="+")
    assert cli.given_options(parser, []) == set()
    assert cli.given_options(parser, ["--tiny", "--num-codes", "4"]) == {"tiny", "num_codes"}  # a default, given
    assert cli.given_options(parser, ["--save", "x", "--tag", "a", "-vv", "--num-c", "3", "--xs", "1", "2"]) == {
        "output", "tag", "v", "num_codes", "xs"}  # --num-c: argparse's abbreviation
    with pytest.raises(SystemExit):
        cli.refuse_options(parser, ("output", "tag", "v"), "go with X", ["--save", "x", "-v"])
    assert "example: error: --save, -v: go with X" in capsys.readouterr().err


@pytest.mark.parametrize("example, loader", [("vq_tokenize", "load_image"), ("diffdis_segment", "read_image")])
def test_examples_read_photos_upright(example, loader, tmp_path):
    """A phone photo stored sideways with an EXIF orientation (6: rotate 90 degrees clockwise to
    view) is read as a viewer shows it, 4 wide x 8 high here, not as stored (8 x 4)."""
    from PIL import Image

    stored = Image.new("RGB", (8, 4), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif)
    read = runpy.run_path(os.path.join(EXAMPLES, f"{example}.py"), run_name=f"{example}_under_test")[loader](str(path))
    size = read.size if isinstance(read, Image.Image) else (read.shape[-1], read.shape[-2])
    assert size == (4, 8)
