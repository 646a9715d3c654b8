"""Benchmark configuration: the Triton interpreter on GPU-less machines, the device fixture,
rows written as each benchmark ends (MMFAST_BENCH_ROWS). Helpers (timing, bandwidth,
record_metrics) are in _utils.py."""
from __future__ import annotations

import json
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


@pytest.fixture(autouse=True)
def _row_as_it_ends(request):
    """MMFAST_BENCH_ROWS=PATH appends each benchmark's summary row (its extra_info, once it holds
    "op") to PATH as one JSON line when the benchmark ends: a run cut off at a deadline (a GPU
    lease) keeps the rows it finished, where --benchmark-json writes only at the session's end.
    benchmarks/summarize.py reads such a file (.jsonl) too."""
    yield
    path = os.environ.get("MMFAST_BENCH_ROWS")
    bench = getattr(request.node, "funcargs", {}).get("benchmark")
    if path and bench is not None and "op" in bench.extra_info:
        with open(path, "a") as f:
            f.write(json.dumps({"test": request.node.nodeid, **bench.extra_info}, default=str) + "\n")
