"""setup.py's build decisions, tested without building (its setup() call is guarded by __main__)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("_mmfast_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "archs, expected",
    [
        ("8.0+PTX;9.0a", True),  # the GPU-less default
        ("9.0a", True),  # built on an H100 / H200
        ("9.0a 8.6", True),  # space-separated lists, as torch accepts
        ("9.0", False),  # no sm_90a binary: wgmma does not exist there
        ("9.0;9.0a", False),  # two sm_90 binaries: the driver might load the one without wgmma
        ("9.0+PTX;9.0a", False),
        ("8.0;8.6", False),
        ("10.0a;12.0a", False),
        ("Hopper;9.0a", False),  # torch's named arch: Hopper is 9.0+PTX
        ("Ampere 9.0a", False),
        ("", False),
    ],
)
def test_the_wgmma_kernels_are_enabled_only_for_an_unambiguous_sm_90a_binary(setup_module, archs, expected):
    assert setup_module.has_sm90a_code(archs) is expected
