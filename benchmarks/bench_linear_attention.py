"""Linear attention: mmfast vs the eager LinFusion formulation vs softmax SDPA.

Shapes are the attn1 layers of SD-1.5 (8 heads, D = 40/80/160), SD-2.1 (D = 64) and
SD-XL (D = 64), at 1024-4096 px on a GPU and scaled down on the CPU, plus the CPU target
shape of the foundation issue, and on a GPU two large-N shapes (N = 262,144 and 2,097,152) whose
floors are hundreds of us. Bytes of the bandwidth floor: forward reads q, k, v and writes out;
backward reads q, k, v, grad_out and writes dq, dk, dv; "% of floor" is against the copy
bandwidth measured in the same run (_utils.peak_bandwidth).

Timing: CPU, wall-clock medians. GPU: every provider under CUDA-graph replay over rotating input
sets that together exceed 4x the L2 (_utils.cuda_graph_ms): a 20 us kernel is not hidden behind
the host's per-call overhead, and no call reads inputs the previous one left in L2; the eager
call's wall time (host overhead included) is recorded as mmfast_call_ms. The model these
numbers are checked against: docs/linear-attention-performance.md.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from mmfast import ops
from mmfast.models.linfusion.official import official_linear_attention

from _utils import (GRAPH_TIMING, bench_device, eager_ms, graph_or_eager_ms, grade_row, median_ms, record_metrics,
                    run_timed)
from linear_attention_shapes import CPU_SHAPES, GPU_SHAPES

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
HAS_TRITON = importlib.util.find_spec("triton") is not None

# name, B, N, H, D
if ON_GPU:
    SHAPES = GPU_SHAPES
    DTYPE = torch.bfloat16
    SDPA_MAX_N = 65536
else:
    SHAPES = CPU_SHAPES
    DTYPE = torch.float32
    SDPA_MAX_N = 4096

CPU_TARGETS = {"forward": 3.0, "backward": 2.0}  # speedup vs eager at "cpu-target"
GPU_TARGETS = {"forward": 0.80, "backward": 0.50}  # floor bytes / time over the measured copy bandwidth
GPU_TARGET_MIN_N = 262144  # issue 14: the targets hold at N >= 262,144 (smaller N: recorded, no target)


def _inputs(b, n, h, d, requires_grad=False):
    make = lambda: torch.randn(b, n, h, d, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)  # noqa: E731
    return make(), make(), make()


def _sdpa(q, k, v):
    # Softmax attention at the same shape, (B, H, N, D) as SDPA wants it.
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _backward(fn, inputs, grad_out):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, grad_out)

    return run


def _backward_only(fn, inputs, grad_out):
    """One forward graph, then its backward again and again (retain_graph): the backward alone,
    not (forward + backward) - forward, whose two noisy medians can subtract to nothing."""
    out = fn(*inputs)
    return lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)


def _forward_fn(provider):
    return {
        "mmfast": lambda q, k, v: ops.linear_attention(q, k, v),
        "triton": lambda q, k, v: ops.linear_attention(q, k, v, backend="triton"),
        "eager": official_linear_attention,
        "sdpa": _sdpa,
    }[provider]


def _gpu_ms(fn, make_inputs, timings: dict, name: str) -> float:
    return graph_or_eager_ms(fn, make_inputs, DEVICE, timings, name)


def _eager_ms(fn, make_inputs) -> float:
    return eager_ms(fn, make_inputs, DEVICE)


def _triton_times(make_inputs, timings: dict):
    """The Triton kernel with its split over N, and with the split off: the one program per
    (b, h, tile) design of fla-org's flash-bidirectional-linear-attention (the issue's
    1.5x target is against that design; its own code is not installed here)."""
    from mmfast.triton import linear_attention as triton_la

    run = lambda q, k, v: ops.linear_attention(q, k, v, backend="triton")  # noqa: E731
    times = {"triton": _gpu_ms(run, make_inputs, timings, "triton")}
    triton_la.SPLIT_SEQUENCE = False
    try:
        times["fla_design"] = _gpu_ms(run, make_inputs, timings, "fla_design")
    finally:
        triton_la.SPLIT_SEQUENCE = True
    return times


def _record(benchmark, direction, name, b, n, h, d, times, **extra):
    """Bandwidth floor: forward reads q, k, v and writes out; backward reads q, k, v,
    grad_out and writes dq, dk, dv. FLOPs: 2 N D^2 per (b, h) for each of the state and
    apply products (forward), twice that for backward."""
    elem = torch.tensor([], dtype=DTYPE).element_size()
    forward = direction == "forward"
    floor_bytes = (4 if forward else 7) * b * n * h * d * elem
    flops = (4 if forward else 8) * b * h * n * d * d
    target = target_met = None
    if not ON_GPU and name == "cpu-target":
        target = f">= {CPU_TARGETS[direction]}x vs eager"
        target_met = times["eager"] / times["mmfast"] >= CPU_TARGETS[direction]
    if "fla_design" in times:  # a stand-in (mmfast's kernel with fla-org's design), not fla-org's code:
        # its ratio is shown, and the 1.5x target stays ungraded until fla-org's code is timed
        extra["fla_design_stand_in_ratio"] = round(times["fla_design"] / times["mmfast"], 3)
        extra["fla_target_met"] = None
    info = record_metrics(benchmark, op=f"linear_attention.{direction}", shape=f"{name} B={b} N={n} H={h} D={d}",
                          device=DEVICE, dtype=DTYPE, times=times, floor_bytes=floor_bytes, flops=flops,
                          target=target, target_met=target_met, measured_bandwidth=True, **extra)
    if ON_GPU and n >= GPU_TARGET_MIN_N and "pct_of_floor" in info:
        grade_row(benchmark, f">= {int(100 * GPU_TARGETS[direction])}% of the measured copy bandwidth",
                  info["pct_of_floor"] >= 100 * GPU_TARGETS[direction])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_forward(benchmark, shape):
    """CPU: wall-clock medians. GPU: every provider under CUDA-graph replay over rotating input
    sets (_gpu_ms); the fixture's own row is the eager call's wall time (host overhead included),
    recorded as mmfast_call_ms."""
    name, b, n, h, d = shape
    q, k, v = _inputs(b, n, h, d)
    timings, extra = {}, {}
    with torch.no_grad():
        call_ms = run_timed(benchmark, lambda: ops.linear_attention(q, k, v), DEVICE)
        if ON_GPU:
            make = lambda: _inputs(b, n, h, d)  # noqa: E731
            del q, k, v
            times = {"mmfast": _gpu_ms(lambda q, k, v: ops.linear_attention(q, k, v), make, timings, "mmfast"),
                     "eager": _gpu_ms(official_linear_attention, make, timings, "eager")}
            if n <= SDPA_MAX_N:
                times["sdpa"] = _gpu_ms(_sdpa, make, timings, "sdpa")
            if HAS_TRITON:
                times.update(_triton_times(make, timings))
            extra = {"mmfast_call_ms": round(call_ms, 4), "timing": timings}
        else:
            times = {"mmfast": call_ms, "eager": median_ms(lambda: official_linear_attention(q, k, v), DEVICE)}
            if n <= SDPA_MAX_N:
                times["sdpa"] = median_ms(lambda: _sdpa(q, k, v), DEVICE, warmup=1, repeats=3)
    _record(benchmark, "forward", name, b, n, h, d, times, **extra)


def _gpu_backward_ms(provider, make, timings):
    """(forward + backward) - forward, each under CUDA-graph replay (_gpu_ms); if either cannot
    be captured, both are timed as eager calls, so the difference never mixes two methods."""
    fn = _forward_fn(provider)

    def forward(q, k, v, grad_out):  # in grad mode as `both` runs it: under no_grad mmfast takes the fused
        return fn(q, k, v)            # op, not state + apply, and the difference charged the backward with it

    def both(q, k, v, grad_out):
        return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

    forward_ms = _gpu_ms(forward, make, timings, f"{provider}_forward")
    both_ms = _gpu_ms(both, make, timings, f"{provider}_forward_backward")
    if {timings[f"{provider}_forward"], timings[f"{provider}_forward_backward"]} != {GRAPH_TIMING}:
        timings[f"{provider}_forward"] = timings[f"{provider}_forward_backward"] = \
            "cuda events, eager calls (one of the two could not be captured)"
        forward_ms, both_ms = _eager_ms(forward, make), _eager_ms(both, make)
    return max(both_ms - forward_ms, 1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_backward(benchmark, shape):
    """The backward alone, per provider: on the CPU the backward of one retained forward graph,
    timed again and again; on a GPU forward + backward minus forward under CUDA-graph replay over
    rotating inputs (the fixture's row is the eager call's wall time, mmfast_call_ms)."""
    name, b, n, h, d = shape
    inputs = _inputs(b, n, h, d, requires_grad=True)
    grad_out = torch.randn(b, n, h, d, device=DEVICE, dtype=DTYPE)
    providers = ["mmfast", "eager"] + (["sdpa"] if n <= SDPA_MAX_N else [])
    if ON_GPU:
        call_ms = run_timed(benchmark, _backward(_forward_fn("mmfast"), inputs, grad_out), DEVICE)
        del inputs, grad_out
        make = lambda: (*_inputs(b, n, h, d, requires_grad=True), torch.randn(b, n, h, d, device=DEVICE, dtype=DTYPE))  # noqa: E731
        timings = {}
        # the Triton twin's backward too (its hi + lo products in the sums that cancel cost MMAs)
        gpu_providers = providers + (["triton"] if HAS_TRITON else [])
        times = {provider: _gpu_backward_ms(provider, make, timings) for provider in gpu_providers}
        _record(benchmark, "backward", name, b, n, h, d, times, mmfast_call_ms=round(call_ms, 4), timing=timings)
        return
    times = {}
    for provider in providers:
        run = _backward_only(_forward_fn(provider), inputs, grad_out)
        times[provider] = run_timed(benchmark, run, DEVICE) if provider == "mmfast" else \
            median_ms(run, DEVICE, repeats=3 if provider == "sdpa" else 7)
    _record(benchmark, "backward", name, b, n, h, d, times)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import torch, mmfast
    from mmfast.memory import PeakMemory

    b, n, h, d = {shape}
    q, k, v = (torch.randn(b, n, h, d) for _ in range(3))
    mmfast.linear_attention(q[:, :64], k[:, :64], v[:, :64])  # load kernels, warm the allocator
    with PeakMemory("cpu") as meter:
        out = mmfast.linear_attention(q, k, v)
    print(meter.peak_bytes)
    """
)


@pytest.mark.skipif(ON_GPU, reason="CPU memory target")
def test_cpu_peak_extra_memory(benchmark):
    """Peak resident memory the forward adds beyond inputs and output (target < 10% of inputs)."""
    b, n, h, d = 2, 16384, 5, 64
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT.format(shape=(b, n, h, d))],
        capture_output=True, text=True, check=True, env={**os.environ},
    )
    extra_bytes = int(result.stdout.strip().splitlines()[-1])
    input_bytes = 3 * b * n * h * d * 4
    output_bytes = b * n * h * d * 4
    # The fresh output is a new allocation; anything beyond it is the op's own memory.
    extra = max(0, extra_bytes - output_bytes)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    record_metrics(benchmark, op="linear_attention.forward.peak_memory", shape=f"cpu-target B={b} N={n} H={h} D={d}",
                   device=DEVICE, dtype=torch.float32, times=None,
                   target=f"< 10% of inputs (measured {100 * extra / input_bytes:.2f}%)",
                   target_met=extra < 0.10 * input_bytes,
                   extra_bytes=extra, pct_of_inputs=round(100 * extra / input_bytes, 2))
