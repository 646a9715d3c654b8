"""examples/aptp_mixed_batch.py end to end, in a subprocess: --tiny, and --experts on tiny experts
written in the released APTP layout (a model folder with arch0..arch2)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from mmfast.testing.tiny_aptp import tiny_experts, write_released_expert  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "aptp_mixed_batch.py")
DIFFERENCE = re.compile(r"max \|mixed - per-expert\| = (\S+) \(output scale (\S+)\)")


def _run(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, EXAMPLE, "--repeats", "1", "--threads", "1", *args], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout


def _relative_difference(stdout):
    difference, scale = map(float, DIFFERENCE.search(stdout).groups())
    return difference / scale


def test_tiny(tmp_path):
    stdout = _run(tmp_path, "--tiny", "--batch", "4", "--codes", "0", "3", "1", "3")
    assert "codes per prompt: [0, 3, 1, 3] (3 distinct of 4)" in stdout
    assert _relative_difference(stdout) <= 1e-4
    assert "one pass per code" in stdout and "dense base UNet" in stdout


def test_released_model_folder(tmp_path):
    base, experts = tiny_experts(3, torch.Generator().manual_seed(2))
    root = tmp_path / "APTP-Tiny"
    for k, (expert, arch) in enumerate(experts):
        write_released_expert(str(root / f"arch{k}"), expert, arch, base, torch.Generator().manual_seed(k))
    stdout = _run(tmp_path, "--experts", str(root), "--batch", "3", "--codes", "2", "0", "2", "--text-tokens", "8")
    for k, (_, arch) in enumerate(experts):
        assert f"expert {k}: {arch.summary()} ({root / f'arch{k}'})" in stdout
    assert "codes per prompt: [2, 0, 2] (2 distinct of 3)" in stdout
    assert _relative_difference(stdout) <= 1e-4
