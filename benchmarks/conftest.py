"""Benchmark configuration: the Triton interpreter on GPU-less machines, the device fixture.
Helpers (timing, bandwidth, record_metrics) are in _utils.py."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mmfast  # noqa: E402,F401

from _utils import bench_device  # noqa: E402


@pytest.fixture
def device():
    return bench_device()
