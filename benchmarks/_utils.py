"""Helpers every benchmark shares: device choice, device-accurate timing, bandwidth
references and `record_metrics`.

Run with pytest-benchmark (`make bench`). Every benchmark times mmfast with the
`benchmark` fixture, measures its baselines in the same run with `median_ms`, and records
times, speedups, GB/s, TFLOP/s and % of the bandwidth floor with `record_metrics`;
benchmarks/summarize.py prints them as one table.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Optional

import torch

from mmfast._info import cpu_model

# Peak HBM bandwidth (bytes/s) by GPU name, for "% of the bandwidth floor".
GPU_PEAK_BANDWIDTH = {
    "H100 80GB HBM3": 3.35e12,
    "H100 SXM": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "H200": 4.8e12,  # not a GH200 (is_h200): its HBM differs by model
    "A100-SXM4-80GB": 2.04e12,
    "A100-SXM4-40GB": 1.56e12,
}


# Dense fp16 / bf16 tensor-core peak (FLOP/s, no sparsity) by GPU name, for "% of peak FLOP/s"
# of the compute-bound ops (VQ search, the masked conv, the APTP step); datasheet figures.
GPU_PEAK_FLOPS_16BIT = {
    "H100 80GB HBM3": 989.4e12,
    "H100 SXM": 989.4e12,
    "H100 PCIe": 756.5e12,
    "H100 NVL": 835.5e12,
    "H200": 989.4e12,  # not a GH200 (is_h200)
    "A100-SXM4-80GB": 312e12,
    "A100-SXM4-40GB": 312e12,
}


def is_h200(device: torch.device) -> bool:
    """An H200 (the issues' GPU targets), not a GH200 superchip, whose name holds "H200" too."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return "H200" in name and "GH200" not in name


def bench_device() -> torch.device:
    name = os.environ.get("MMFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of fn() in ms, synchronised; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


_measured_bandwidth: dict = {}


def peak_bandwidth(device: torch.device, measured: bool = False):
    """(bytes/s, how it was obtained): on a GPU the datasheet HBM figure, or with measured=True
    (and always on the CPU) the measured copy bandwidth of the device (read + write of a buffer
    well past the caches: 1 GiB on a GPU, 256 MB on the CPU), measured once per process."""
    if device.type == "cuda" and not measured:
        sheet = _datasheet_bandwidth(device)
        return (sheet, "datasheet") if sheet else (None, "unknown GPU")
    key = str(device)
    if key not in _measured_bandwidth:
        numel = (2**30 if device.type == "cuda" else 256 * 2**20) // 4
        src = torch.ones(numel, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        ms = median_ms(lambda: dst.copy_(src), device, warmup=3, repeats=10 if device.type == "cuda" else 5)
        _measured_bandwidth[key] = 2 * numel * 4 / (ms * 1e-3)
        del src, dst
    source = "measured copy"
    if device.type == "cuda":
        sheet = _datasheet_bandwidth(device)
        if sheet:
            source += f" ({sheet / 1e12:.2f} TB/s datasheet)"
    return _measured_bandwidth[key], source


def _datasheet_bandwidth(device: torch.device):
    """GPU_PEAK_BANDWIDTH's figure for this GPU (a GH200 is not an H200), or None."""
    return _datasheet(device, GPU_PEAK_BANDWIDTH)


def _datasheet(device: torch.device, table: dict):
    """table's figure for this GPU (a GH200 is not an H200), or None."""
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in table.items() if key in name and (key != "H200" or is_h200(device))), None)


class GraphCaptureError(RuntimeError):
    """fn could not be captured into a CUDA graph (it synchronises, or uses an API that capture
    forbids); out-of-memory and kernel errors are not this."""


def cuda_graph_ms(fn, make_inputs, device: torch.device, min_bytes: Optional[int] = None, replays: int = 7):
    """Device time of one fn(*inputs) in ms, timed under CUDA-graph replay over rotating input
    sets, so that neither the host's per-call overhead (dispatch, allocation, launch: tens of
    us, more than a small kernel) nor L2 reuse (inputs left in cache by the previous call) is
    timed. make_inputs() returns a tuple of tensors; enough sets are made that together they
    exceed min_bytes (default 4x the L2 size), at least 2. One graph runs fn on every set in
    turn; the result is the median over `replays` replays divided by the number of sets.
    Raises GraphCaptureError when fn cannot be captured (the caller records that and falls
    back); any other error (out of memory, a failing kernel) propagates."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 60 * 2**20)
    min_bytes = 4 * l2 if min_bytes is None else min_bytes
    sets = [make_inputs()]
    per_set = sum(t.numel() * t.element_size() for t in sets[0])
    count = max(2, -(-min_bytes // per_set))
    sets += [make_inputs() for _ in range(count - 1)]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside capture (allocator, lazy init, autotuning)
        for inputs in sets:
            fn(*inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for inputs in sets:
                fn(*inputs)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as error:
        message = str(error)[:300]
        sets.clear()  # the traceback would keep the input sets alive during the fallback
        inputs = error = None  # noqa: F841
        torch.cuda.synchronize(device)
        raise GraphCaptureError(message) from None
    graph.replay()
    synchronize(device)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / count)
    del graph
    return statistics.median(times)


GRAPH_TIMING = "cuda graph replay, rotating inputs > 4x L2"


def graph_or_eager_ms(fn, make_inputs, device: torch.device, timings: dict, name: str) -> float:
    """GPU device time of one fn(*make_inputs()) call: CUDA-graph replay over rotating input sets
    larger than L2 (cuda_graph_ms: a 20 us kernel is visible, no host overhead, no L2 reuse). If
    the call cannot be captured, CUDA events around eager calls, and timings[name] says so (it
    records how every timed provider was timed); any other error (out of memory, a failing
    kernel) fails the benchmark."""
    try:
        timings[name] = GRAPH_TIMING
        return cuda_graph_ms(fn, make_inputs, device)
    except GraphCaptureError as error:
        timings[name] = f"cuda events, eager calls (graph capture failed: {error})"
    return eager_ms(fn, make_inputs, device)


def timed_alike(timings: dict, *names: str) -> bool:
    """Whether graph_or_eager_ms timed these providers the same way (all replayed, or all eager
    whatever their capture errors): a ratio of a replayed provider over one whose capture failed
    (eager calls, host overhead included) would favour the replayed one, so a target graded on
    it is left ungraded instead."""
    return len({timings.get(name) == GRAPH_TIMING for name in names}) == 1


def eager_ms(fn, make_inputs, device: torch.device) -> float:
    """median_ms of fn(*make_inputs()) on one input set (host overhead included)."""
    inputs = make_inputs()
    return median_ms(lambda: fn(*inputs), device)


def run_timed(benchmark, fn, device: torch.device, rounds: int = 7, warmup: int = 2) -> float:
    """mmfast's median time of fn in ms, measured as median_ms measures the baselines (so their
    ratios compare like with like), and fn run through pytest-benchmark for its own table. On
    the CPU the returned median is pytest-benchmark's (wall time, synchronised); on a GPU it is
    median_ms's CUDA events, as for the baselines (pytest-benchmark's wall time, host overhead
    included, then runs once). Under --benchmark-disable (a smoke run) median_ms with one
    warm-up and 3 repeats: a cold first call against warm baselines gave ratios off by 2-4x."""

    def synced():
        fn()
        synchronize(device)

    if benchmark.disabled:
        return median_ms(fn, device, warmup=max(1, warmup), repeats=3)
    if device.type == "cuda":
        benchmark.pedantic(synced, rounds=1, iterations=1, warmup_rounds=warmup)
        return median_ms(fn, device, warmup=0, repeats=rounds)
    benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=warmup)
    return benchmark.stats.stats.median * 1e3


def paired_rounds(benchmark, timers: dict, rounds: int) -> dict:
    """Times several contenders in rounds, so that all of them see the same machine state (a
    shared VM's speed drifts by tens of percent over minutes). timers: {name: a callable that
    runs its contender and returns its time in ms}, with "mmfast" among them. Even rounds run
    every other timer and then "mmfast", odd rounds "mmfast" first, so that neither side always
    follows the other (memory just freed, caches just filled): the sequence is O M | M O | O M
    ... "mmfast" is pytest-benchmark's timed function and the others run in its setup hook (an
    odd round's others in the next round's setup, the last one's after the rounds); each timer
    measures itself, so the pairs hold under --benchmark-disable too, where pytest-benchmark runs
    one round. Returns {name: [ms per round]}; compare with paired_ratio."""
    times = {name: [] for name in timers}

    def others_once():
        for name, timer in timers.items():
            if name != "mmfast":
                times[name].append(timer())

    def setup():
        done = len(times["mmfast"])
        if done % 2 == 0:
            if done:
                others_once()  # the odd round just ended: its others, right after its mmfast
            others_once()  # this even round's others, before its mmfast

    def candidate():
        times["mmfast"].append(timers["mmfast"]())

    benchmark.pedantic(candidate, setup=setup, rounds=rounds, iterations=1)
    if len(times["mmfast"]) % 2 == 0:
        others_once()  # the last round was odd
    return times


def paired_ratio(times: dict, numerator: str, denominator: str) -> tuple:
    """(median, sorted list) of the per-round ratios times[numerator][i] / times[denominator][i]:
    the paired figure, not the ratio of the two medians."""
    ratios = sorted(a / b for a, b in zip(times[numerator], times[denominator]))
    return statistics.median(ratios), ratios


# Timed variants of mmfast itself (another mode of the same op), not baselines: they get a time
# column but no "speedup vs", and are never a row's primary baseline.
MMFAST_MODES = ("static_plan", "triton")


def is_mmfast_mode(name: str) -> bool:
    return name.startswith("mmfast_") or name in MMFAST_MODES


def _time_columns(times: dict) -> dict:
    mmfast_ms = times["mmfast"]
    columns = {"mmfast_ms": round(mmfast_ms, 4), "timed": [name for name in times if name != "mmfast"]}
    baselines = [name for name in times if name != "mmfast" and not is_mmfast_mode(name)]
    if baselines:
        columns["baseline"] = baselines[0]
    for name in times:
        if name == "mmfast":
            continue
        columns[f"{name}_ms"] = round(times[name], 4)
        if not is_mmfast_mode(name):
            columns[f"speedup_vs_{name}"] = round(times[name] / mmfast_ms, 2)
    return columns


def _load_per_core() -> Optional[float]:
    """The host's 1-minute load over the cores this process may use (its CPU affinity), or None."""
    if not hasattr(os, "getloadavg"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return round(os.getloadavg()[0] / (cores or 1), 2)


def record_metrics(benchmark, *, op: str, shape: str, device: torch.device, dtype, times: Optional[dict],
                   floor_bytes: Optional[float] = None, flops: Optional[float] = None,
                   target: Optional[str] = None, target_met: Optional[bool] = None,
                   items: Optional[tuple] = None, measured_bandwidth: bool = False, **extra) -> dict:
    """Writes one summary-table row into benchmark.extra_info and returns it.

    times: {"mmfast": ms, baseline: ms, ...}, medians measured in the same run (None for
    rows that time nothing, e.g. memory); every baseline gets `<name>_ms` and
    `speedup_vs_<name>` (baseline ms / mmfast ms), the first is the row's primary baseline.
    floor_bytes: the bytes a perfect kernel moves (gives GB/s and % of the bandwidth floor: that
    bandwidth is the device's copy bandwidth (CPU: measured; GPU: the datasheet's unless
    measured_bandwidth), so inputs served from a cache can exceed 100%);
    flops: the useful floating-point operations (gives TFLOP/s, and for fp16 / bf16 on a known GPU
    % of its dense tensor-core peak). Both need times.
    target / target_met: the issue's target for this row, stated and checked.
    items: (count, unit) processed per call, e.g. (8, "images"): gives the throughput column.
    measured_bandwidth: % of floor against the copy bandwidth measured in this process instead
    of the GPU's datasheet figure (peak_bandwidth).
    """
    info = {"op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "device": machine_name(device),
            # the host's 1-minute load per core when the row ended: above 1, other work shared the
            # cores and the row's times are suspect (summarize.py marks it)
            "load_per_core": _load_per_core()}
    if times:
        info.update(_time_columns(times))
    mmfast_ms = times["mmfast"] if times else None
    if floor_bytes is not None and mmfast_ms:
        info["gbps"] = round(floor_bytes / (mmfast_ms * 1e-3) / 1e9, 2)
        bandwidth, source = peak_bandwidth(device, measured=measured_bandwidth)
        if bandwidth:
            info["pct_of_floor"] = round(100 * floor_bytes / bandwidth / (mmfast_ms * 1e-3), 1)
            info["bandwidth_ref"] = source
    if flops is not None and mmfast_ms:
        info["tflops"] = round(flops / (mmfast_ms * 1e-3) / 1e12, 4)
        peak = _datasheet(device, GPU_PEAK_FLOPS_16BIT) if device.type == "cuda" and dtype in (
            torch.float16, torch.bfloat16) else None
        if peak:  # the CPU has no such figure here (a VM's clock and FMA ports are not known)
            info["pct_of_peak_flops"] = round(100 * flops / (mmfast_ms * 1e-3) / peak, 1)
    if items is not None and mmfast_ms:
        info["throughput"] = f"{items[0] / (mmfast_ms * 1e-3):.3g} {items[1]}/s"
    if target is not None:  # target_met None: not decided by this row (e.g. no such hardware)
        info["target"], info["target_met"] = target, None if target_met is None else bool(target_met)
    info.update(extra)
    _set_smoke_verdicts_aside(benchmark, info)
    benchmark.extra_info.update(info)
    return info


def grade_row(benchmark, target: str, target_met: bool) -> None:
    """Sets a row's target and verdict after record_metrics (from a column it computed)."""
    info = {"target": target, "target_met": bool(target_met)}
    _set_smoke_verdicts_aside(benchmark, info)
    benchmark.extra_info.update(info)


def _set_smoke_verdicts_aside(benchmark, info: dict) -> None:
    """A smoke run's (--benchmark-disable) few rounds grade nothing: its verdicts move to
    smoke_<key> and the row's stay None (a smoke run once recorded a paired target as met)."""
    if benchmark.disabled:
        for key in [k for k in info if k == "target_met" or k.endswith("_target_met")]:
            if info[key] is not None:
                info["smoke_" + key], info[key] = info[key], None
