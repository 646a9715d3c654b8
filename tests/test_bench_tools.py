"""The benchmark suite's shared tools, which decide what the README's numbers mean:
benchmarks/_utils.py's paired rounds and row columns, and benchmarks/summarize.py's tables, on
synthetic runs (no timing)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_tools_{name}", _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


utils, summarize = _load("_utils"), _load("summarize")


class _Rounds:
    """pytest-benchmark's pedantic, as the suite uses it: setup then the timed function, per round."""

    def pedantic(self, fn, setup=None, rounds=1, iterations=1, warmup_rounds=0):
        for _ in range(rounds):
            setup()
            fn()


@pytest.mark.parametrize("rounds, order", [(1, "OM"), (4, "OMMOOMMO"), (5, "OMMOOMMOOM")])
def test_paired_rounds_alternate_and_stay_aligned(rounds, order):
    seen = []
    timers = {"other": lambda: seen.append("O") or 10.0 * len(seen), "mmfast": lambda: seen.append("M") or 1.0}
    times = utils.paired_rounds(_Rounds(), timers, rounds)
    assert "".join(seen) == order
    assert len(times["other"]) == len(times["mmfast"]) == rounds
    median, ratios = utils.paired_ratio({"a": [2.0, 4.0, 9.0], "b": [1.0, 1.0, 3.0]}, "a", "b")
    assert (median, ratios) == (3.0, [2.0, 3.0, 4.0])  # the median of per-round ratios, not of times


def test_summarize_knows_the_same_mmfast_modes():
    assert tuple(summarize.MODES) == tuple(utils.MMFAST_MODES)  # summarize.py runs without torch: a copy


def test_time_columns_keep_mmfast_modes_out_of_the_speedups():
    columns = utils._time_columns({"mmfast": 2.0, "static_plan": 1.0, "dense": 8.0, "mmfast_eager": 3.0})
    assert columns["baseline"] == "dense" and columns["speedup_vs_dense"] == 4.0
    assert "speedup_vs_static_plan" not in columns and columns["static_plan_ms"] == 1.0
    assert columns["timed"] == ["static_plan", "dense", "mmfast_eager"]


class _Benchmark:
    def __init__(self, disabled):
        self.disabled, self.extra_info = disabled, {}


@pytest.mark.parametrize("disabled", [False, True])
def test_a_smoke_run_grades_no_target(disabled):
    """Found by a benchmark audit: a --benchmark-disable run (one round) wrote target_met from a
    paired ratio on a loaded host; its verdicts now go to smoke_<key> and the row's stay None."""
    import torch

    bench = _Benchmark(disabled)
    utils.record_metrics(bench, op="x", shape="s", device=torch.device("cpu"), dtype=torch.float32,
                         times={"mmfast": 1.0, "eager": 3.0}, target=">= 2x", target_met=True, other_target_met=False)
    utils.grade_row(bench, ">= 60%", True)
    info = bench.extra_info
    if disabled:
        assert info["target_met"] is None and info["other_target_met"] is None
        assert info["smoke_target_met"] is True and info["smoke_other_target_met"] is False
    else:
        assert info["target_met"] is True and info["other_target_met"] is False and "smoke_target_met" not in info


def _row(op, **extra):
    return {"op": op, "shape": "s", "dtype": "float32", "device": "cpu", "mmfast_ms": 1.0, **extra}


def _run(tmp_path, rows, missing=()):
    benchmarks = [{"fullname": f"bench_{family}.py::test_{i}", "extra_info": row}
                  for i, (family, row) in enumerate(rows)]
    benchmarks += [{"fullname": name, "extra_info": {}} for name in missing]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": benchmarks, "commit_info": {"id": "abc1234567", "dirty": True},
                                "machine_info": {"torch": "2.x", "threads": 2}, "datetime": "2026-12-05T22:00:00"}))
    markdown = tmp_path / "bench.md"
    result = subprocess.run([sys.executable, str(_BENCHMARKS / "summarize.py"), str(path), "--markdown", str(markdown)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout, markdown.read_text()


def test_summary_tables_per_family_with_verdicts_and_key_ratios(tmp_path):
    rows = [("vq", _row("vq_quantize", timed=["faiss"], faiss_ms=2.0, speedup_vs_faiss=2.0, target=">= 1.2x faiss",
                        target_met=True)),
            ("vq", _row("vq_quantize.bf16", target="none without AMX", target_met=None)),
            ("pruned", _row("masked_conv2d[paired]", timed=["dense", "static_plan"], dense_ms=3.0,
                            speedup_vs_dense=3.0, static_plan_ms=0.9, mmfast_dense_ratio=0.33,
                            target="<= 0.33x dense", target_met=False, static_plan_target_met=True,
                            load_per_core=1.7))]
    text, markdown = _run(tmp_path, rows, missing=["bench_vq.py::test_memory"])
    assert "Commit abc1234567 (uncommitted changes)" in text and "torch 2.x" in text
    assert "== vq: 1 of 1 targets met" in text and "== pruned: 0 of 1 targets met" in text
    vq_table = text.split("== vq")[1].split("==")[0]
    assert "dense" not in vq_table  # each family has its own baseline columns
    assert "n/a" in vq_table  # an unjudged target is not a NO
    pruned_table = text.split("== pruned")[1]
    assert "speedup vs static_plan" not in pruned_table and "static_plan ms" in pruned_table
    assert "mmfast dense 0.33" in pruned_table and "static plan: yes" in pruned_table
    assert "! masked_conv2d[paired]" in pruned_table and "load exceeded its cores" in text
    assert "Overall: 1 of 2 targets met (3 rows)" in text
    assert "1 benchmarks wrote no summary row: bench_vq.py::test_memory" in text
    assert "### vq: 1 of 1 targets met" in markdown


def test_summary_of_a_rows_file_keeps_each_tests_last_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [{"test": "bench_decode.py::test_a", **_row("decode_attention", mmfast_ms=5.0)},
             {"test": "bench_decode.py::test_a", **_row("decode_attention", mmfast_ms=4.0)}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = subprocess.run([sys.executable, str(_BENCHMARKS / "summarize.py"), str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "4.0" in result.stdout and "5.0" not in result.stdout and "== decode" in result.stdout


def test_summary_of_a_missing_or_cut_off_file_says_why(tmp_path):
    result = subprocess.run([sys.executable, str(_BENCHMARKS / "summarize.py"), str(tmp_path / "none.json")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "does not exist" in result.stderr and "MMFAST_BENCH_ROWS" in result.stderr
    (tmp_path / "cut.json").write_text('{"benchmarks": [{"fullname": "x"')
    result = subprocess.run([sys.executable, str(_BENCHMARKS / "summarize.py"), str(tmp_path / "cut.json")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "not a complete pytest-benchmark JSON file" in result.stderr
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"test": "bench_vq.py::t", **_row("vq_quantize")}) + '\n{"test": "bench_vq.py::u", "op')
    result = subprocess.run([sys.executable, str(_BENCHMARKS / "summarize.py"), str(rows)], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "rows.jsonl:2 is not a whole JSON row" in result.stderr
    assert "vq_quantize" in result.stdout


def test_skipped_benchmarks_are_listed_as_ungraded(tmp_path):
    """A benchmark that skips (a missing baseline, a GPU-only target, a module without its
    dependency) left no row and no trace; conftest.py now records it in --benchmark-json and in
    MMFAST_BENCH_ROWS, and summarize.py lists it with its reason."""
    import shutil

    for name in ("conftest.py", "_utils.py", "pytest.ini"):
        shutil.copy(_BENCHMARKS / name, tmp_path / name)
    (tmp_path / "bench_fake.py").write_text(
        "import pytest\n\n"
        "def test_ran(benchmark):\n    benchmark(lambda: None)\n\n"
        "@pytest.mark.skipif(True, reason='needs a GPU')\ndef test_gpu_only(benchmark):\n    benchmark(lambda: None)\n\n"
        "def test_no_baseline(benchmark):\n    pytest.skip('faiss is not installed')\n")
    (tmp_path / "bench_other.py").write_text("import pytest\npytest.importorskip('no_such_module_here')\n")
    rows, report = tmp_path / "rows.jsonl", tmp_path / "bench.json"
    # without this run's pytest-xdist worker variables (pytest-benchmark times nothing under xdist)
    env = {name: value for name, value in __import__("os").environ.items() if not name.startswith("PYTEST_")}
    env.update(MMFAST_BENCH_ROWS=str(rows), PYTHONPATH=str(Path(__file__).resolve().parents[1] / "python"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             f"--benchmark-json={report}", "--benchmark-max-time=0.001"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = {entry["test"]: entry["skipped"] for entry in json.loads(report.read_text())["skipped"]}
    assert skipped == {"bench_fake.py::test_gpu_only": "needs a GPU",
                       "bench_fake.py::test_no_baseline": "faiss is not installed",
                       "bench_other.py": "could not import 'no_such_module_here': No module named 'no_such_module_here'"}
    for path in (report, rows):
        summary = subprocess.run([sys.executable, str(_BENCHMARKS / "summarize.py"), str(path)], capture_output=True,
                                 text=True)
        assert summary.returncode == 0, summary.stderr
        assert "3 benchmarks (or files) did not run here, their targets not graded:" in summary.stdout
        assert "bench_fake.py::test_no_baseline: faiss is not installed" in summary.stdout


def test_timed_alike_only_for_the_same_method():
    timings = {"mmfast": utils.GRAPH_TIMING, "cdist": utils.GRAPH_TIMING, "expanded": "cuda events, eager calls"}
    assert utils.timed_alike(timings, "mmfast", "cdist")
    assert not utils.timed_alike(timings, "mmfast", "expanded")
    assert not utils.timed_alike(timings, "mmfast", "missing")
    failed = {name: f"cuda events, eager calls (graph capture failed: {name} synchronises)" for name in "ab"}
    assert utils.timed_alike({**failed, "c": "cuda events, eager calls"}, "a", "b", "c")  # eager alike, any error


def test_summary_header_names_the_gpu_and_the_host():
    rows = [{"device": "NVIDIA H200"}, {"device": "NVIDIA H200"}]
    machine = {"cpu": {"brand_raw": "Intel(R) Xeon(R) Processor"}}
    assert "NVIDIA H200 (host: Intel(R) Xeon(R) Processor)" in summarize.header(machine, {}, "", rows)
    cpu_rows = [{"device": "AMD EPYC, 2 threads"}]
    assert "host" not in summarize.header({"cpu": {"brand_raw": "AMD EPYC"}}, {}, "", cpu_rows)
