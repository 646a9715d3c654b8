"""examples/liquid_generate.py and examples/vq_tokenize.py end to end, as a user runs them (a
subprocess, as on the command line): --tiny, and vq_tokenize on a VQGAN checkpoint file written
here in the taming format (random weights: files, sizes and the printed summary only)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

Image = pytest.importorskip("PIL.Image")

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def _run(script, *args):
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args, "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _size(path):
    with Image.open(path) as image:
        return image.size, image.mode


def test_liquid_generate_tiny(tmp_path):
    out = _run("liquid_generate.py", "--tiny", "--num-images", "2", "--seed", "3", "--out", str(tmp_path))
    assert "2 images x 256 tokens ((16, 16) codes)" in out and "ms / step" in out
    (width, height), mode = _size(tmp_path / "grid.png")
    assert mode == "RGB" and width > 0 and height > 0


def test_vq_tokenize_tiny_and_checkpoint_file(tmp_path):
    pytest.importorskip("skimage")
    from mmfast.testing.tiny_vqgan import write_taming_checkpoint

    tiny = tmp_path / "tiny"
    out = _run("vq_tokenize.py", "--tiny", "--out", str(tiny))
    assert "PSNR" in out
    safetensors_path, _ = write_taming_checkpoint(tmp_path / "checkpoint")
    from_file = tmp_path / "from_file"
    out = _run("vq_tokenize.py", "--checkpoint", safetensors_path, "--config", "tiny", "--resolution", "64",
               "--out", str(from_file))
    assert safetensors_path in out and "PSNR" in out
    for directory in (tiny, from_file):
        assert _size(directory / "reconstruction.png")[1] == "RGB"
        assert (directory / "code_histogram.png").is_file()
