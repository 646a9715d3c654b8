"""Shared test configuration: devices, backends and per-dtype tolerances."""
from __future__ import annotations

import importlib.util
import os

import torch

# Without a GPU the Triton kernels run under the interpreter, on CPU tensors. It must be
# chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mmfast  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

# (atol, rtol) against the fp32/fp64 reference computed from the same inputs: about two
# units in the last place of the output dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")


def backend_params():
    """(backend, device) pairs this machine can run, CUDA ones marked."""
    params = [pytest.param(("native", "cpu"), id="native-cpu")]
    params.append(pytest.param(("native", "cuda"), id="native-cuda", marks=[pytest.mark.cuda, cuda_only]))
    if HAS_TRITON:
        params.append(pytest.param(("triton", TRITON_DEVICE), id=f"triton-{TRITON_DEVICE}"))
    return params


def assert_close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
