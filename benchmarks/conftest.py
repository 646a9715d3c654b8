"""Benchmark configuration: the Triton interpreter on GPU-less machines, the device fixture,
one marker per family (`-m vq` runs bench_vq.py: `-k vq` would also pick the VQGAN's and other
names), rows written as each benchmark ends (MMFAST_BENCH_ROWS), the benchmarks that did not run
with their reasons (their targets are not graded: summarize.py lists them), the torch version and
thread count in pytest-benchmark's machine info. Helpers (timing, bandwidth, record_metrics) are in
_utils.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mmfast  # noqa: E402,F401

from _utils import bench_device  # noqa: E402


SKIPPED = []  # (test or module, reason) of every benchmark skipped in this session


FAMILIES = sorted(path.stem[len("bench_"):] for path in Path(__file__).parent.glob("bench_*.py"))


def pytest_configure(config):
    for family in FAMILIES:
        config.addinivalue_line("markers", f"{family}: the benchmarks of bench_{family}.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        family = Path(str(item.fspath)).stem[len("bench_"):]
        if family in FAMILIES:
            item.add_marker(getattr(pytest.mark, family))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()


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


def _note_skip(nodeid, longrepr):
    """Records a skipped benchmark (or a module that skipped at import, e.g. without diffusers):
    a JSON line in MMFAST_BENCH_ROWS and an entry of --benchmark-json's "skipped" list, so a
    report says which targets went ungraded and why instead of leaving no row."""
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
    SKIPPED.append({"test": nodeid, "skipped": reason})
    path = os.environ.get("MMFAST_BENCH_ROWS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(SKIPPED[-1]) + "\n")


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        _note_skip(report.nodeid, report.longrepr)


def pytest_collectreport(report):
    if report.skipped:
        _note_skip(report.nodeid, report.longrepr)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = list(SKIPPED)
