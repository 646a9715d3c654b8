"""Masked-channel conv of a mixed-code batch (APTP): mmfast.ops.masked_conv2d vs, in the same run,
  dense         F.conv2d of the full (unpruned) layer: the cost without pruning
  mask-multiply the official masked-training path: x * in_mask, dense conv, * out_mask
  group-by-code one dense conv per code on pre-sliced weights AND already compact activations
                (a batch of physically pruned experts sorted by code: the strong baseline; it
                does no gather or scatter, which mmfast's dense channel layout needs)
  triton        (GPU) the same op through its Triton twin (backend="triton"): the A/B the
                issue-rate analysis in docs/masked-conv-performance.md asks for
  static_plan   (GPU) mmfast inside keep_packed_weights(): every code's weights packed once
                and kept, so a call packs only its inputs (the default call also packs the
                used codes' weights)

Shapes: SD-2.1's ResNet 3x3 convs (C -> C) at 768 px (latents 96/48/24/12; C 320/640/1280/1280)
and 512 px (64/32/16/8), batch 8 over 5 distinct codes (codes 0-4 of K = 8; 2+2+2+1+1
samples), whole GroupNorm groups (32 per layer) kept at ratio `keep` on both the input and the
output side, so the kept FLOP fraction is about keep^2. On the 2-core CPU the 96^2 level is
left out (one dense call alone takes seconds) and 512 px runs at keep 0.5 only.

On the CPU the keep-0.5 target is decided by test_masked_conv2d_paired: this VM's speed drifts
by tens of percent between calls, more than the 1.1x margin, so there every contender is timed
in each round and the ratios are medians of per-round ratios; it also times the static plan
(mmfast.ops.keep_packed_weights), which test_masked_conv2d leaves out.

test_masked_group_norm times the ResNet blocks' GroupNorm + SiLU (per-code affine) at the same
levels: mmfast.ops.masked_group_norm vs dense F.group_norm + F.silu of the full layer and vs
group-by-code on compact activations (one F.group_norm per code over its kept groups). Its
floor is one read of the kept channels plus one write of every channel (GB/s, % of the
bandwidth); the issue states no target for it.
"""
from __future__ import annotations

import importlib.util
import statistics

import pytest
import torch
import torch.nn.functional as F

from mmfast.ops import keep_packed_weights, masked_conv2d, masked_group_norm

from _utils import (bench_device, eager_ms, graph_or_eager_ms, is_h200, median_ms, paired_ratio, paired_rounds,
                    record_metrics, run_timed, timed_alike)

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
ON_H200 = ON_GPU and is_h200(DEVICE)  # issue 10's GPU targets: other GPUs report times, grade nothing
HAS_TRITON = importlib.util.find_spec("triton") is not None
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BATCH_CODES = [0, 0, 1, 1, 2, 2, 3, 4]  # batch 8, 5 distinct codes, sorted once per UNet call
CODES = 8
GROUPS = 32

# (resolution, latent side, channels)
LEVELS_768 = [(768, 96, 320), (768, 48, 640), (768, 24, 1280), (768, 12, 1280)]
LEVELS_512 = [(512, 64, 320), (512, 32, 640), (512, 16, 1280), (512, 8, 1280)]
if ON_GPU:
    CASES = [(level, keep) for level in LEVELS_768 + LEVELS_512 for keep in (0.5, 0.75, 1.0)]
else:
    CASES = [(level, keep) for level in LEVELS_768[1:] for keep in (0.5, 0.75, 1.0)] + \
            [(level, 0.5) for level in LEVELS_512]
REPEATS = 7 if ON_GPU else 3
PAIRED_ROUNDS = 5  # rounds of the paired CPU comparison (rows give medians of per-round ratios)


def group_mask(codes: int, channels: int, keep: float, generator) -> torch.Tensor:
    """(codes, channels) bool: round(keep * 32) whole groups per code, chosen at random."""
    kept = round(keep * GROUPS)
    rows = [torch.zeros(GROUPS, dtype=torch.bool).index_fill_(0, torch.randperm(GROUPS, generator=generator)[:kept],
                                                                True) for _ in range(codes)]
    return torch.stack(rows).repeat_interleave(channels // GROUPS, dim=1)


def make_layer(side: int, channels: int, keep: float):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(BATCH_CODES), channels, side, side, generator=g).to(DEVICE, DTYPE)
    weight = (torch.randn(CODES, channels, channels, 3, 3, generator=g) * 0.02).to(DEVICE, DTYPE)
    bias = torch.randn(CODES, channels, generator=g).to(DEVICE, DTYPE)
    in_mask, out_mask = group_mask(CODES, channels, keep, g).to(DEVICE), group_mask(CODES, channels, keep, g).to(DEVICE)
    codes = torch.tensor(BATCH_CODES, device=DEVICE)
    return x, weight, bias, codes, in_mask, out_mask


def group_by_code_inputs(x, weight, bias, codes, in_mask, out_mask):
    """Per code present: (compact activations, pre-sliced weight, bias): the physically pruned
    experts' own tensors, built outside the timed region."""
    work = []
    for code in torch.unique(codes).tolist():
        rows = (codes == code).nonzero()[:, 0]
        kin, kout = in_mask[code].nonzero()[:, 0], out_mask[code].nonzero()[:, 0]
        work.append((x[rows][:, kin].contiguous(), weight[code][kout][:, kin].contiguous(),
                     bias[code][kout].contiguous()))
    return work


@pytest.mark.parametrize("case", CASES, ids=[f"{r}px-{s}x{s}-C{c}-keep{k}" for (r, s, c), k in CASES])
def test_masked_conv2d(benchmark, case):
    (resolution, side, channels), keep = case
    x, weight, bias, codes, in_mask, out_mask = make_layer(side, channels, keep)
    work = group_by_code_inputs(x, weight, bias, codes, in_mask, out_mask)
    dense_weight, dense_bias = weight[0], bias[0]
    sample_in = in_mask[codes][:, :, None, None].to(DTYPE)
    sample_out = out_mask[codes][:, :, None, None].to(DTYPE)

    def mmfast_call():
        return masked_conv2d(x, weight, bias, codes, in_mask, out_mask, padding=1)

    baselines = {
        "group_by_code": lambda: [F.conv2d(xs, w, b, padding=1) for xs, w, b in work],
        "dense": lambda: F.conv2d(x, dense_weight, dense_bias, padding=1),
        "mask_multiply": lambda: F.conv2d(x * sample_in, dense_weight, dense_bias, padding=1) * sample_out,
    }
    times = {"mmfast": run_timed(benchmark, mmfast_call, DEVICE, rounds=REPEATS, warmup=1)}
    extra = {}
    if ON_GPU:
        times, timings = _device_times(side, channels, keep)
        # eager over eager: the static plan cannot be captured, so it is not divided by a graph time
        # (dense_eager stays out of times: a speedup column would mix it with mmfast's graph time)
        extra["dense_eager_ms"] = round(times.pop("dense_eager"), 4)
        extra["static_plan_dense_ratio"] = round(times["static_plan"] / extra["dense_eager_ms"], 3)
        extra["timing"] = timings
    else:
        for name, fn in baselines.items():
            times[name] = median_ms(fn, DEVICE, warmup=1, repeats=REPEATS)

    kept_macs = sum(xs.shape[0] * w.shape[0] * w.shape[1] * 9 * side * side for xs, w, _ in work)
    dense_macs = len(BATCH_CODES) * channels * channels * 9 * side * side
    fraction = kept_macs / dense_macs
    target, met = _target(times, fraction, keep, resolution, side)
    if target and not timed_alike(extra.get("timing", {}), "mmfast", "dense", "group_by_code"):
        target, met = target + " (ungraded: the contenders were timed unlike, see timing)", None
    record_metrics(benchmark, op="masked_conv2d", shape=f"{resolution}px {side}x{side} C={channels} keep={keep} "
                   f"B=8 codes=5", device=DEVICE, dtype=DTYPE, times=times, flops=2 * kept_macs,
                   target=target, target_met=met, kept_flop_fraction=round(fraction, 3),
                   dense_ratio=round(times["mmfast"] / times["dense"], 3),
                   group_by_code_ratio=round(times["mmfast"] / times["group_by_code"], 3), **extra)


def _device_times(side, channels, keep):
    """GPU device times (ms) of every contender under CUDA-graph replay over rotating layers
    (_utils.cuda_graph_ms), and how each was timed. CUDA events around one eager call also time
    the host's work before the launch: the first H200 run timed the 8x8 level's dense conv
    (15 GFLOP) at 139 us so. The layers are built once and shared by the contenders; the eager
    mmfast call (CUDA events) is kept as mmfast_eager, and the static plan is timed so too, with
    an eager dense conv (dense_eager) for its ratio. cuDNN's convolutions run with
    cudnn.benchmark on (the fastest algorithm for each fixed shape, as a user would set it)."""
    layers, position, timings = [], [0], {}

    def make_inputs():  # (x, weight, bias, codes, in_mask, out_mask, sample_in, sample_out, *group-by-code)
        if position[0] == len(layers):
            x, weight, bias, codes, in_mask, out_mask = layer = make_layer(side, channels, keep)
            masks = (in_mask[codes][:, :, None, None].to(DTYPE), out_mask[codes][:, :, None, None].to(DTYPE))
            work = group_by_code_inputs(*layer)
            layers.append(layer + masks + tuple(t for item in work for t in item))
        position[0] += 1
        return layers[position[0] - 1]

    def conv(backend=None):
        return lambda x, w, b, c, i, o, *_: masked_conv2d(x, w, b, c, i, o, padding=1, backend=backend)

    contenders = {
        "mmfast": conv(),
        "group_by_code": lambda *t: [F.conv2d(t[j], t[j + 1], t[j + 2], padding=1) for j in range(8, len(t), 3)],
        "dense": lambda x, w, b, *_: F.conv2d(x, w[0], b[0], padding=1),
        "mask_multiply": lambda x, w, b, c, i, o, si, so, *_: F.conv2d(x * si, w[0], b[0], padding=1) * so,
    }
    if HAS_TRITON:  # the Triton twin (wgmma on sm_90): predicted ahead of the CUDA kernel
        contenders["triton"] = conv("triton")
    times = {}
    benchmark_mode = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for name, fn in contenders.items():
            position[0] = 0
            times[name] = graph_or_eager_ms(fn, make_inputs, DEVICE, timings, name)
        position[0] = 0
        times["dense_eager"] = eager_ms(contenders["dense"], make_inputs, DEVICE)
        timings["dense_eager"] = "cuda events, eager calls (the static plan's comparison)"
    finally:
        torch.backends.cudnn.benchmark = benchmark_mode
    # The static plan (every code's packed weights kept): eager, since captured calls never use
    # kept weights (a graph could outlive the keep_packed_weights block that owns them).
    position[0] = 0
    with keep_packed_weights(budget_mb=8192):
        times["static_plan"] = eager_ms(conv(), make_inputs, DEVICE)
    timings["static_plan"] = "cuda events, eager calls (captured calls do not use kept weights)"
    position[0] = 0
    times["mmfast_eager"] = eager_ms(conv(), make_inputs, DEVICE)
    timings["mmfast_eager"] = "cuda events, eager calls"
    return times, timings


CPU_TARGET = "<= 0.33x dense and <= 1.1x group-by-code"


def _cpu_target_met(dense_ratio, group_by_code_ratio):
    """The issue's CPU target at keep 0.5, from mmfast's time over each baseline's."""
    return dense_ratio <= 0.33 and group_by_code_ratio <= 1.1


def _target(times, fraction, keep, resolution, side):
    """The issue's per-layer targets (None where it states none): on an H200 at the 768 px
    shapes only (issue 10: "per layer ... at the 768 px shapes"; the 512 px rows are reported)."""
    if not ON_H200 or resolution != 768:  # CPU keep 0.5: test_masked_conv2d_paired decides it, in rounds
        return None, None
    parts, met = [f"<= {fraction + 0.1:.2f}x dense (kept FLOP fraction + 0.1)"], \
        times["mmfast"] <= (fraction + 0.1) * times["dense"]
    if side in (24, 12):
        parts.append(">= 1.2x group-by-code")
        met = met and times["group_by_code"] / times["mmfast"] >= 1.2
    return ", ".join(parts), met


@pytest.mark.skipif(ON_GPU, reason="the CPU keep-0.5 target, measured in rounds (the GPU rows are stable)")
@pytest.mark.parametrize("level", [level for level, keep in CASES if keep == 0.5], ids=lambda l: f"{l[0]}px-{l[1]}x{l[1]}-C{l[2]}")
def test_masked_conv2d_paired(benchmark, level):
    """The CPU keep-0.5 target (<= 0.33x dense and <= 1.1x group-by-code), measured in rounds:
    each round times group-by-code, dense and the static plan (median of 3 calls each; the plan
    is entered per round and its first call packs, untimed) and then the default mmfast call,
    so all see the same machine state. Ratios: medians over PAIRED_ROUNDS rounds of per-round
    ratios."""
    resolution, side, channels = level
    x, weight, bias, codes, in_mask, out_mask = make_layer(side, channels, 0.5)
    work = group_by_code_inputs(x, weight, bias, codes, in_mask, out_mask)

    def mmfast_call():
        return masked_conv2d(x, weight, bias, codes, in_mask, out_mask, padding=1)

    def static_plan_ms():
        with keep_packed_weights():
            return median_ms(mmfast_call, DEVICE, warmup=1, repeats=3)

    timers = {
        "group_by_code": lambda: median_ms(lambda: [F.conv2d(xs, w, b, padding=1) for xs, w, b in work], DEVICE,
                                           warmup=0, repeats=3),
        "dense": lambda: median_ms(lambda: F.conv2d(x, weight[0], bias[0], padding=1), DEVICE, warmup=0, repeats=3),
        "static_plan": static_plan_ms,
        "mmfast": lambda: median_ms(mmfast_call, DEVICE, warmup=0, repeats=3),
    }
    for timer in timers.values():  # warm-up: oneDNN primitives, scratch buffers
        timer()
    times = paired_rounds(benchmark, timers, PAIRED_ROUNDS)
    ratios = {f"{a}_{b}_ratio": paired_ratio(times, a, b) for a in ("mmfast", "static_plan")
              for b in ("group_by_code", "dense")}
    met = {a: _cpu_target_met(ratios[f"{a}_dense_ratio"][0], ratios[f"{a}_group_by_code_ratio"][0])
           for a in ("mmfast", "static_plan")}
    kept_macs = sum(xs.shape[0] * w.shape[0] * w.shape[1] * 9 * side * side for xs, w, _ in work)
    benchmark.group = f"masked-conv2d-paired-{resolution}px-{side}x{side}"
    record_metrics(benchmark, op="masked_conv2d[paired]", shape=f"{resolution}px {side}x{side} C={channels} keep=0.5 "
                   f"B=8 codes=5", device=DEVICE, dtype=DTYPE, flops=2 * kept_macs,
                   times={contender: statistics.median(ms) for contender, ms in times.items()},
                   target=CPU_TARGET + " (paired medians)", target_met=met["mmfast"],
                   static_plan_target_met=met["static_plan"],
                   # Paired medians (not ratios of the medians above), and every round's ratio.
                   **{name: round(median, 3) for name, (median, _) in ratios.items()},
                   **{f"{name}_rounds": [round(r, 3) for r in rounds] for name, (_, rounds) in ratios.items()})


NORM_LEVELS = LEVELS_768 + LEVELS_512 if ON_GPU else LEVELS_768[1:] + LEVELS_512
NORM_CASES = [(level, keep) for level in NORM_LEVELS for keep in ((0.5, 1.0) if ON_GPU else (0.5,))]


@pytest.mark.parametrize("case", NORM_CASES, ids=[f"{r}px-{s}x{s}-C{c}-keep{k}" for (r, s, c), k in NORM_CASES])
def test_masked_group_norm(benchmark, case):
    """GroupNorm(32) + SiLU of a mixed-code batch, per-code affine, kept groups at `keep`."""
    (resolution, side, channels), keep = case
    g = torch.Generator().manual_seed(side * channels)
    x = torch.randn(len(BATCH_CODES), channels, side, side, generator=g).to(DEVICE, DTYPE)
    weight = (1 + 0.1 * torch.randn(CODES, channels, generator=g)).to(DEVICE, DTYPE)
    bias = (0.1 * torch.randn(CODES, channels, generator=g)).to(DEVICE, DTYPE)
    mask = group_mask(CODES, channels, keep, g).to(DEVICE)
    codes = torch.tensor(BATCH_CODES, device=DEVICE)
    work = []  # per code present: compact activations, its kept groups' affine, their number
    for code in torch.unique(codes).tolist():
        kept = mask[code].nonzero()[:, 0]
        rows = (codes == code).nonzero()[:, 0]
        work.append((x[rows][:, kept].contiguous(), weight[code][kept].contiguous(), bias[code][kept].contiguous(),
                     round(GROUPS * len(kept) / channels)))

    def mmfast_call():
        return masked_group_norm(x, weight, bias, GROUPS, codes, mask, activation="silu")

    baselines = {
        "group_by_code": lambda: [F.silu(F.group_norm(xs, groups, w, b)) for xs, w, b, groups in work],
        "dense": lambda: F.silu(F.group_norm(x, GROUPS, weight[0], bias[0])),
    }
    if ON_GPU and HAS_TRITON:
        baselines["triton"] = lambda: masked_group_norm(x, weight, bias, GROUPS, codes, mask, activation="silu",
                                                        backend="triton")
    times = {"mmfast": run_timed(benchmark, mmfast_call, DEVICE, rounds=REPEATS, warmup=1)}
    for name, fn in baselines.items():
        times[name] = median_ms(fn, DEVICE, warmup=1, repeats=REPEATS)
    kept_elements = sum(xs.numel() for xs, *_ in work)
    floor_bytes = (kept_elements + x.numel()) * x.element_size()  # read the kept channels, write all
    benchmark.group = f"masked-group-norm-{resolution}px-{side}x{side}"
    record_metrics(benchmark, op="masked_group_norm[silu]", shape=f"{resolution}px {side}x{side} C={channels} "
                   f"keep={keep} B=8 codes=5", device=DEVICE, dtype=DTYPE, times=times, floor_bytes=floor_bytes)
