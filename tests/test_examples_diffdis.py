"""examples/diffdis_segment.py end to end, in --tiny mode at 64 px (random weights: files and sizes only)."""
from __future__ import annotations

import os
import runpy

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "diffdis_segment.py")


@pytest.fixture(scope="module")
def example():
    """The example's globals (main, ...), loaded once; torch's thread count restored afterwards."""
    threads = torch.get_num_threads()
    yield runpy.run_path(EXAMPLE, run_name="diffdis_segment_example")
    torch.set_num_threads(threads)  # --tiny on the CPU sets 1


def _size(path):
    with Image.open(path) as image:
        return image.size, image.mode


def test_default_inputs_mask_only(example, tmp_path):
    pytest.importorskip("skimage")
    out = tmp_path / "out"
    timings = example["main"](["--tiny", "--mask-only", "--resolution", "64", "--device", "cpu",
                               "--output", str(out)])
    assert len(timings) == 3
    for name in ("astronaut", "chelsea", "coffee"):
        (width, height), _ = _size(out / f"{name}.png")  # the sample photo, written as an input
        assert _size(out / f"{name}_mask.png") == ((width, height), "L")
        assert _size(out / f"{name}_overlay.png") == ((width, height), "RGB")
        assert not (out / f"{name}_edge.png").exists()


def test_a_16_bit_grayscale_photo_is_read_as_the_pipeline_reads_it(example, tmp_path):
    """The example converted images to RGB with PIL, which clips 16-bit values to 255: the
    camera photo came out 99.9996% white. It reads them as the pipeline does (0..65535 -> [0, 1])."""
    skimage_data = pytest.importorskip("skimage.data")
    camera = skimage_data.camera()
    Image.fromarray(camera.astype(np.uint16) * 257).save(tmp_path / "camera16.png")
    Image.fromarray(camera).save(tmp_path / "camera8.png")
    wide = example["read_image"](str(tmp_path / "camera16.png"))
    narrow = example["read_image"](str(tmp_path / "camera8.png"))
    assert wide.shape == narrow.shape == (3, *camera.shape)
    torch.testing.assert_close(wide, narrow, rtol=0, atol=1e-6)


def test_folder_input(example, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"first": (90, 70), "second": (40, 50)}  # (width, height)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(folder / "first.png")
    Image.fromarray(rng.integers(0, 256, (50, 40, 4), dtype=np.uint8)).save(folder / "second.png")  # RGBA
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    timings = example["main"](["--tiny", "--input", str(folder), "--resolution", "64", "--device", "cpu",
                               "--batch-size", "2", "--output", str(out)])
    assert [os.path.basename(path) for path, _ in timings] == ["first.png", "second.png"]
    for stem, size in sizes.items():
        assert _size(out / f"{stem}_mask.png") == (size, "L")
        assert _size(out / f"{stem}_edge.png") == (size, "L")
        assert _size(out / f"{stem}_overlay.png") == (size, "RGB")
    assert sorted(os.listdir(out)) == sorted(f"{stem}_{kind}.png" for stem in sizes
                                             for kind in ("mask", "edge", "overlay"))


def test_clear_errors(example, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:  # neither --tiny nor --checkpoint
        example["main"](["--output", str(tmp_path)])
    assert error.value.code == 2 and "--tiny" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no images in the folder"):
        example["main"](["--tiny", "--input", str(empty), "--output", str(tmp_path / "out")])
    (empty / "broken.png").write_text("not a png")
    with pytest.raises(SystemExit, match="broken.png"):
        example["main"](["--tiny", "--input", str(empty), "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="does not exist"):
        example["main"](["--tiny", "--input", str(tmp_path / "missing.jpg"), "--output", str(tmp_path / "out")])


def test_a_bad_linear_attention_level_is_refused_before_any_file_is_written(example, tmp_path, capsys):
    """--linear-attention LEVELS beyond the UNet's levels is known only once the model is loaded:
    it is refused then (argparse's status 2), before the output folder or the sample copies exist."""
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as error:
        example["main"](["--tiny", "--linear-attention", "9", "--output", str(output)])
    assert error.value.code == 2 and "--linear-attention" in capsys.readouterr().err
    assert not output.exists()


def test_checkpoint_mode_with_a_saved_embedding(example, tmp_path):
    """--checkpoint on a local directory in the released layout (a tiny one here), saving the
    empty-prompt embedding, then a run from that embedding: mask, edge and overlay files each time."""
    from mmfast.testing.tiny_diffdis import save_tiny_diffdis_checkpoint

    save_tiny_diffdis_checkpoint(str(tmp_path / "ckpt"))
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    embedding = tmp_path / "empty.safetensors"
    common = ["--checkpoint", str(tmp_path / "ckpt"), "--input", str(tmp_path / "in.png"), "--resolution", "64",
              "--device", "cpu"]
    for extra, out in ((["--save-embedding", str(embedding)], tmp_path / "out1"),
                       (["--embedding", str(embedding)], tmp_path / "out2")):
        timings = example["main"](common + extra + ["--output", str(out)])
        assert len(timings) == 1
        assert _size(out / "in_mask.png") == ((80, 48), "L") and _size(out / "in_edge.png") == ((80, 48), "L")
        assert _size(out / "in_overlay.png") == ((80, 48), "RGB")
        assert embedding.is_file()
