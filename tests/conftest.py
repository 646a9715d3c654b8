"""Shared test configuration: OpenMP's wait policy in pytest-xdist workers, the Triton
interpreter on GPU-less machines, the `cuda` marker, seeding and the fixtures of the LinFusion
tests. Helpers are in _utils.py."""
from __future__ import annotations

import os
import sys
import warnings

# `make test` runs 2 pytest-xdist workers on CI's 2 cores, each with torch's default thread count,
# so that every test also runs the kernels' threaded paths and thread-dependent work plans. OpenMP
# threads that spin-wait for a core the other worker holds ran the suite 1.6x slower than one
# process: workers' threads sleep while they wait instead (read when torch loads libgomp).
if os.environ.get("PYTEST_XDIST_WORKER"):
    if "torch" in sys.modules:
        warnings.warn("torch was imported before tests/conftest.py: OMP_WAIT_POLICY=PASSIVE cannot take "
                      "effect, and xdist workers may spin-wait for each other's cores (slow)")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Without a GPU the Triton kernels run under the interpreter, on CPU tensors. It must be
# chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mmfast  # noqa: E402

from _utils import LINFUSION_BACKENDS  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped on machines without an NVIDIA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- LinFusion fixtures -----------------------------------------------------------------

@pytest.fixture(params=LINFUSION_BACKENDS)
def backend(request):
    """Runs the test once per backend available on the CPU (reference, native)."""
    with mmfast.use_backend(request.param):
        yield request.param


@pytest.fixture(scope="module")
def unet():
    """C = 32/64, 2 heads (D = 16/32); 4 attn1 layers."""
    pytest.importorskip("diffusers")
    from mmfast.testing.tiny_diffusers import tiny_unet

    return tiny_unet((32, 64), heads=2)


@pytest.fixture(scope="module")
def sd15_style_unet():
    """SD-1.5 head dims: D = 40 / 80 / 160 (C = 80/160/320 with 2 heads)."""
    pytest.importorskip("diffusers")
    from mmfast.testing.tiny_diffusers import tiny_unet

    return tiny_unet((80, 160, 320), heads=2, norm_num_groups=16)
