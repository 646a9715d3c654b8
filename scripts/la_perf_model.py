#!/usr/bin/env python3
"""Performance model of the CUDA linear-attention forward (and the backward's design) on an H200, pass by pass.

    python scripts/la_perf_model.py [--sass build/sass-report.json] [--latency-ns 700]

For each shape of the GPU benchmark set (benchmarks/bench_linear_attention.py) and the
large-N shapes of issue 14, and for each pass of the forward as csrc/include/mmfast/cuda/
linear_attention/ launches it today (state -> reduce when split -> apply), it prints:

  bytes     DRAM traffic: token tensors read once (the Dk/Dv tiles that re-read them run
            back to back and hit L2), fp32 split-N partials written and read back, the
            state read once per bh, the output written;
  FLOPs     the MMA work the kernels issue: the cp.async kernels' tiles are W wide with W sized
            to D (state_tile_width: 48 for D = 40, 80 for D = 80 and 160, else 64; apply the
            same), the register-staged kernels' 64, so D = 40 does (48/40)^2 = 1.44x the useful
            work; phi / normalisation negligible;
  design    max(bytes / 4.3 TB/s, FLOPs / MMA rate): what the pass could reach with enough
            loads in flight. The cp.async kernels run bf16 / fp16 mma.sync at 790 TFLOP/s with
            the extra products of async_mma_work, the register-staged ones TF32 WMMA at half
            that, their state pass twice (phi(k) as hi + lo) (copy bandwidth 4.3 TB/s and
            790 TFLOP/s measured, KINDS.md of the device library);
  latency   the Little's-law ceiling of the current code: the staging loop of each pass
            issues all of a thread's token loads of a slice before using any (TOKEN_LOADS_IN_FLIGHT:
            k and v in the state pass, q in apply; scripts/sass_report.py shows them issued
            together), so an SM keeps resident_threads x loads x element_bytes in flight and
            the pass moves at most SMs x that / latency. Resident blocks per SM come from the
            SASS report's occupancy when --sass is given (else the defaults below: one block
            for the bf16 tensor-core variants). --one-load models the code before this design
            (each load consumed before the next: one in flight per thread);
  floor     the whole forward's bandwidth floor: q, k, v read and out written once, at 4.3 TB/s
            (the floor the benchmark reports against).

  issue     with --sass, an instruction-issue estimate of the cp.async kernels: every warp runs
            the ring loop ('loop instr' of the SASS report) once per slice (the state kernel's
            warps that do not multiply, at W = 48 / 80, without its ldmatrix and mma) and the
            loop around it ('outer instr': the state pass's flush, apply's item epilogue) once
            per group; an SM issues 4 warp instructions per clock at 1.755 GHz. Not a bound either way:
            the static counts hold paths an iteration skips (too high), 4 per clock is the best
            case (too low). Each column is the max of itself and the ones before it.

The latency figure is a model, not a measurement: the loaded DRAM latency on Hopper is about
600-900 ns (--latency-ns); the ratio to the floor is what the redesign of issue 14 must bring
to <= 1.3x (N = 16,384) and <= 1.15x (N = 262,144). Only a GPU run measures it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from linear_attention_shapes import GPU_SHAPES  # noqa: E402

SMS = 132                 # H200 multiprocessors
COPY_BW = 4.3e12          # B/s, device-to-device copy measured on the lent H200s
BF16_FLOPS = 790e12       # dense bf16 mma.sync, measured
TF32_FLOPS = BF16_FLOPS / 2  # dense TF32 WMMA: half the bf16 rate
TILE = 64                 # kTile (csrc/include/mmfast/cuda/tile_gemm.cuh)
THREADS = 256             # kThreads
MIN_CHUNK = 256           # kMinChunk (state.cuh)
ACC_BYTES = 4             # fp32 accumulators for fp16 / bf16 / fp32 inputs

# name, B, N, H, D: the GPU benchmark shapes, then issue 14's worked example.
SHAPES = GPU_SHAPES + [("issue14-bh10", 1, 16384, 10, 64)]


@dataclass
class Pass:
    name: str
    kernel: str
    bytes: float
    flops: float
    flops_rate: float = TF32_FLOPS  # the tensor-core rate its products run at
    mma: str = "TF32 MMA"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


STATE_WIDTHS = (48, 64, 80)  # the cp.async state kernel's tile widths (AsyncStateTile)


def state_tile_width(dk: int, dv: int) -> int:
    """la::state_tile_width on an H200 (W = 80's ring fits): of 48, 64, 80 the width with the
    least padded products ceil(dk/W) ceil(dv/W) W^2, 64 on a tie."""
    padded = {w: ceil_div(dk, w) * ceil_div(dv, w) * w * w for w in STATE_WIDTHS}
    return min(STATE_WIDTHS, key=lambda w: (padded[w], w != 64))


def _state_col_groups(width: int) -> int:
    row_groups = pairs = width // 16
    return 2 if 2 * row_groups <= THREADS // 32 and pairs % 2 == 0 else 1


def apply_tile_width(dk: int, dv: int) -> int:
    """la::apply_tile_width on an H200: the same rule as the state pass (every width fits)."""
    return state_tile_width(dk, dv)


def apply_item_tokens(width: int) -> int:
    """Tokens per item of the cp.async apply kernel (AsyncApplyTile::kItemTokens): 128 at W = 48
    (its warps: 8 groups of 16 tokens x all 48 columns), else 64 (4 x 2 groups)."""
    return 128 if width <= 48 else TILE


def apply_warp_columns(width: int) -> int:
    """Dv columns one warp of the cp.async apply kernel multiplies: W / column groups."""
    return width // (THREADS // 32 // (apply_item_tokens(width) // 16))


def state_warp_columns(width: int) -> int:
    """Dv columns one warp of the cp.async state kernel multiplies (AsyncStateTile): two column
    groups when the row groups leave room (W = 64: 32 each), else one (48, 80: the whole width)."""
    return width // _state_col_groups(width)


def state_multiplying_warps(width: int) -> int:
    """Warps of the cp.async state kernel that multiply (AsyncStateTile::kWarps): W = 48 3, 64 8,
    80 5; the others copy and prepare only."""
    return width // 16 * _state_col_groups(width)


def state_slice_tokens(width: int) -> int:
    """Tokens per slice of the cp.async state kernel (AsyncStateTile::kSliceTokens): the narrow
    tile (48) takes kNarrowSliceTokens, the others kSliceTokens."""
    return header_constant("kNarrowSliceTokens" if width <= 48 else "kSliceTokens", "state.cuh")


def state_flush_slices(width: int) -> int:
    """Slices per fp64 flush of the cp.async state kernel (kAsyncFlushTokens / slice tokens)."""
    return header_constant("kAsyncFlushTokens", "state.cuh") // state_slice_tokens(width)


def state_plan(bh: int, n: int, dk: int, dv: int, sms: int = SMS) -> tuple[int, int]:
    """(chunk, nchunks) as la::plan_state chooses them (its tiles: state_tile_width wide)."""
    width = state_tile_width(dk, dv)
    base = bh * ceil_div(dk, width) * ceil_div(dv, width)
    min_chunk = max(MIN_CHUNK, 2 * max(dk, dv))
    want = max(1, min(header_constant("kChunkOversub", "state.cuh") * sms // base, ceil_div(n, min_chunk)))
    whole = state_slice_tokens(width)  # chunks hold whole ring slices
    chunk = ceil_div(ceil_div(n, want), whole) * whole
    return chunk, ceil_div(n, chunk)


# mma.sync work of the cp.async kernels per useful product (16-bit operands, fp32 sums): each
# warp's Dv columns (state: state_warp_columns, apply: width / 2) take 8 more for m (state) or
# z (apply); the state pass multiplies phi(k) as hi + lo (2x), apply multiplies S as hi + lo
# (2x) and m once (its columns hold both parts).
def async_mma_work(pass_name: str, width: int = TILE) -> float:
    if pass_name == "state":
        cols = state_warp_columns(width)
        return 2 * (cols + 8) / cols
    cols = apply_warp_columns(width)
    return (2 * cols + 8) / cols

KERNELS = {  # variant -> (state kernel, apply kernel)
    "async": ("la_state_async_kernel", "la_apply_async_kernel"),
    "staged": ("la_state_kernel", "la_apply_kernel"),
    "one-load": ("la_state_kernel", "la_apply_kernel"),
}


def forward_passes(bh: int, n: int, d: int, elem: int = 2, variant: str = "async") -> list[Pass]:
    """The forward's launches with their DRAM bytes and issued MMA FLOPs (Dk = Dv = d)."""
    state_kernel, apply_kernel = KERNELS[variant]
    width = state_tile_width(d, d) if variant == "async" else TILE
    apply_width = apply_tile_width(d, d) if variant == "async" else TILE
    state_padded = ceil_div(d, width) * width
    apply_padded = ceil_div(d, apply_width) * apply_width
    _, nchunks = state_plan(bh, n, d, d)
    state_elems = d * d + d
    mma = 2.0 * bh * n * apply_padded * apply_padded
    state_mma = 2.0 * bh * n * state_padded * state_padded
    partials = bh * nchunks * state_elems * ACC_BYTES if nchunks > 1 else 0
    final = bh * state_elems * ACC_BYTES
    state_bytes = bh * n * 2 * d * elem + (partials or final)
    if variant == "async":
        passes = [Pass("state", state_kernel, state_bytes, state_mma * async_mma_work("state", width), BF16_FLOPS,
                       "bf16 MMA")]
    else:
        # phi(k) as tf32 hi + lo (kSplitCancellingSums): S as accurate as m, for the backward's
        # cancelling sums; two products each
        passes = [Pass("state", state_kernel, state_bytes, 2 * state_mma, mma="2xTF32 MMA")]
    if nchunks > 1:
        passes.append(Pass(f"reduce ({nchunks} chunks)", "la_state_reduce_kernel", partials + final, 0.0))
    apply_bytes = bh * n * 2 * d * elem + final
    if variant == "async":
        passes.append(Pass("apply", apply_kernel, apply_bytes, mma * async_mma_work("apply", apply_width), BF16_FLOPS,
                           "bf16 MMA"))
    else:
        passes.append(Pass("apply", apply_kernel, apply_bytes, mma))
    return passes


def floor_seconds(bh: int, n: int, d: int, elem: int = 2) -> float:
    return bh * n * 4 * d * elem / COPY_BW


# --- the backward ----------------------------------------------------------------------------
# Its cp.async tile kernel (backward_async.cuh, la_backward_async_kernel): 16-bit inputs whose
# rows are 16-byte aligned and head dims up to 160, 64-token items against the head's whole
# matrix (S | m, or dS | dm) in shared memory as 16-bit hi + lo. Each item multiplies phi(x) by
# the matrix and y by its transpose (multiply_pair, each as hi + lo: 4 products of 64 x DP x DP);
# apply_backward with the fused sums (pair width 64) adds the weighted sums (phi(q) / z)^T dO
# and its m column, its operand as hi + lo (2 products of 64 x DP x (DP + 8)).
PAIR_TOKENS = 64              # kPairTokens
MAX_SUM_UNIT_TILES = 64       # kMaxSumUnitTiles
PAIR_BLOCKS_64 = 2            # kPairBlocks<64, 3>: the resident grid plan_state_sums plans for
BACKWARD_KERNEL = "la_backward_async_kernel"


def pair_dim(dk: int, dv: int) -> int:
    """la::pair_dim: the tile kernel's width, 0 past 160 (the register-staged kernels run)."""
    d = max(dk, dv)
    return 64 if d <= 64 else 80 if d <= 80 else 128 if d <= 128 else 160 if d <= 160 else 0


def plan_state_sums(bh: int, ntiles: int, dk: int, dv: int, sms: int = SMS) -> tuple[int, int]:
    """(unit_tiles, units_per_head) as la::plan_state_sums chooses them: the busiest block's
    tiles plus its partial writes and its share of the reduction's reads, least; ties: longer units."""
    grid = sms * PAIR_BLOCKS_64
    partial = (dk * dv + dk) * 4.0 / (PAIR_TOKENS * (dk + dv) * 2.0)
    best, unit_tiles = float("inf"), 1
    for tiles in range(1, min(MAX_SUM_UNIT_TILES, ntiles) + 1):
        units = bh * ceil_div(ntiles, tiles)
        cost = -(-units // grid) * (tiles + partial) + units * partial / grid
        if cost <= best:
            best, unit_tiles = cost, tiles
    return unit_tiles, ceil_div(ntiles, unit_tiles)


def backward_passes(bh: int, n: int, d: int, elem: int = 2, fused: bool | None = None) -> list[Pass]:
    """The backward's launches on the tile kernel (Dk = Dv = d <= 160) with their DRAM bytes and
    issued MMA FLOPs. fused (default: where the op fuses, pair width 64): apply_backward sums dS
    and dm itself, in units (plan_state_sums) whose fp32 partials the reduce sums; unfused, it
    writes (z, dz) per token and the weighted state pass (the forward's state kernel) reads q and
    grad_out again."""
    dp = pair_dim(d, d)
    if not dp:
        raise ValueError(f"the backward's tile kernel takes head dims up to 160, got {d}")
    fused = dp == 64 if fused is None else fused
    token = bh * n * d * elem  # one token tensor
    state_elems = d * d + d
    final = bh * state_elems * ACC_BYTES
    pair_mma = 4 * 2.0 * bh * ceil_div(n, PAIR_TOKENS) * PAIR_TOKENS * dp * dp
    passes = []
    if fused:
        _, units = plan_state_sums(bh, ceil_div(n, PAIR_TOKENS), d, d)
        partials = bh * units * state_elems * ACC_BYTES if units > 1 else 0
        sums_mma = 2 * 2.0 * bh * ceil_div(n, PAIR_TOKENS) * PAIR_TOKENS * dp * (dp + 8)
        passes.append(Pass("apply_backward + dS sums", BACKWARD_KERNEL, 3 * token + final + (partials or final),
                           pair_mma + sums_mma, BF16_FLOPS, "bf16 MMA"))
        if partials:
            passes.append(Pass(f"reduce ({units} units)", "la_state_reduce_kernel", partials + final, 0.0))
    else:
        z_dz = bh * n * 2 * ACC_BYTES
        passes.append(Pass("apply_backward", BACKWARD_KERNEL, 3 * token + final + z_dz, pair_mma, BF16_FLOPS,
                           "bf16 MMA"))
        width = state_tile_width(d, d)
        _, nchunks = state_plan(bh, n, d, d)
        partials = bh * nchunks * state_elems * ACC_BYTES if nchunks > 1 else 0
        padded = ceil_div(d, width) * width
        passes.append(Pass("weighted state (dS, dm)", "la_state_async_kernel", 2 * token + z_dz + (partials or final),
                           2.0 * bh * n * padded * padded * async_mma_work("state", width), BF16_FLOPS, "bf16 MMA"))
        if partials:
            passes.append(Pass(f"reduce ({nchunks} chunks)", "la_state_reduce_kernel", partials + final, 0.0))
    passes.append(Pass("state_backward", BACKWARD_KERNEL, 4 * token + final, pair_mma, BF16_FLOPS, "bf16 MMA"))
    return passes


def backward_floor_seconds(bh: int, n: int, d: int, elem: int = 2) -> float:
    """q, k, v and grad_out read, grad_q, grad_k and grad_v written, once."""
    return bh * n * 7 * d * elem / COPY_BW


def backward_table() -> str:
    """Bytes, FLOPs and the design time (bandwidth or MMA bound) of each backward pass; no
    latency or issue model (the tile kernel's ring is not in the SASS report's model yet)."""
    lines = ["| shape | B*H | N | D | pass | MB | GFLOP | design us (limit) | floor us (bwd) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, b, n, h, d in SHAPES:
        bh = b * h
        if not pair_dim(d, d):
            continue
        floor, total = backward_floor_seconds(bh, n, d), 0.0
        for p in backward_passes(bh, n, d):
            t_bw, t_mma = p.bytes / COPY_BW, p.flops / p.flops_rate
            total += max(t_bw, t_mma)
            lines.append(f"| {name} | {bh} | {n} | {d} | {p.name} | {p.bytes / 1e6:.1f} | {p.flops / 1e9:.1f} | "
                         f"{max(t_bw, t_mma) * 1e6:.1f} ({'bandwidth' if t_bw >= t_mma else p.mma}) | |")
        lines.append(f"| **{name} backward** | | | | | | | {total * 1e6:.1f} ({total / floor:.2f}x floor) | "
                     f"{floor * 1e6:.1f} |")
    return "\n".join(lines)


def header_constant(name: str, header: str) -> int:
    """A `constexpr int name = value;` of a linear-attention CUDA header (the pipeline depths)."""
    text = (ROOT / "csrc/include/mmfast/cuda/linear_attention" / header).read_text()
    return int(re.search(rf"constexpr\s+int\s+{name}\s*=\s*(\d+)\s*;", text).group(1))


# Register-staged kernels: token loads one thread has in flight in each pass's streaming loop,
# kStagePerThread (8) per streamed operand (state: k and v; apply: q, the state operand comes
# from L2); the reduce's partial-sum loop, unrolled by the compiler, keeps 4 (SASS report).
TOKEN_LOADS_IN_FLIGHT = {"la_state_kernel": 16, "la_apply_kernel": 8, "la_state_reduce_kernel": 4}
# cp.async kernels: a ring of S stages whose wait_group(S - 2) leaves S - 2 commit groups in
# flight while a thread computes; one group is a thread's share of one slice (async_group_bytes).
ASYNC_RING = {"la_state_async_kernel": ("kAsyncStages", "state.cuh"),
              "la_apply_async_kernel": ("kAsyncApplyStages", "apply.cuh")}
# The configuration the bf16 benchmarks run: elu(x) + 1 on tensor cores (the state kernels'
# forward instantiation: Scaled = false).
BENCH_CONFIG = "bf16, FeatureMap=1, true"


def bench_template_args(kernel: str, width: int = TILE) -> str:
    """The SASS report's template arguments of the benchmarked instantiation: the cp.async
    kernels' at their tile width (the state kernel's forward: Scaled = false), the others' bf16
    elu(x) + 1 tensor-core one."""
    if kernel == "la_state_async_kernel":
        return f"{BENCH_CONFIG}, false, {width}"
    if kernel == "la_apply_async_kernel":
        return f"{BENCH_CONFIG}, {width}"
    return BENCH_CONFIG
DEFAULT_BLOCKS_PER_SM = {"la_state_kernel": 1, "la_apply_kernel": 1, "la_state_reduce_kernel": 8,
                         "la_state_async_kernel": 1, "la_apply_async_kernel": 2}


def _sass_row(kernel: str, sass: dict | None, width: int = TILE) -> dict | None:
    want = "f32" if "reduce" in kernel else bench_template_args(kernel, width)
    return next((r for r in (sass or {}).get("kernels", [])
                 if r["kernel"] == kernel and r["template_args"] == want), None)


def resident_threads(kernel: str, sass: dict | None, width: int = TILE) -> int:
    """Threads per SM: blocks/SM of the SASS report's occupancy for the benchmarked
    configuration (the reduce is instantiated on the fp32 accumulator) x 256."""
    row = _sass_row(kernel, sass, width)
    return (row["blocks_per_sm"] if row else DEFAULT_BLOCKS_PER_SM[kernel]) * THREADS


def async_group_bytes(kernel: str, width: int = TILE) -> int:
    """Bytes of one commit group of a thread (16-bit inputs): its share of a slice, state
    state_slice_tokens(width) tokens x width dims of k and of v, apply 64 tokens x width dims
    of q (kApplySliceDims at 64; 128 tokens at W = 48)."""
    if kernel == "la_state_async_kernel":
        return 2 * state_slice_tokens(width) * width * 2 // THREADS
    return apply_item_tokens(width) * width * 2 // THREADS


def bytes_in_flight(kernel: str, sass: dict | None, elem: int, one_load: bool = False, width: int = TILE) -> int:
    """Bytes one thread keeps in flight in the pass's streaming loop: the cp.async ring's
    pending groups (the SASS report's figure when given, else the headers' depth), or the
    register-staged loads issued before their first use."""
    if kernel in ASYNC_RING:
        row = _sass_row(kernel, sass, width)
        if row and row.get("pipelined_bytes"):
            return row["pipelined_bytes"]
        name, header = ASYNC_RING[kernel]
        return (header_constant(name, header) - 2) * async_group_bytes(kernel, width)
    width = ACC_BYTES if "reduce" in kernel else elem
    return width * (1 if one_load else TOKEN_LOADS_IN_FLIGHT[kernel])


SM_CLOCK = 1.755e9   # Hz: H200 SM clock under sustained load (1.98 GHz boost)
ISSUE_PER_CLOCK = 4   # warp instructions an SM issues per clock (4 schedulers), at best
WARPS = THREADS // 32


def ring_slices(p: Pass, bh: int, n: int, d: int) -> int:
    """Slices the cp.async kernel of a pass streams: the state pass state_slice_tokens tokens of
    k and v per (Dk tile, Dv tile) and chunk; apply an item's tokens x W dims of q per Dv tile."""
    if p.kernel == "la_state_async_kernel":
        width = state_tile_width(d, d)
        tiles = ceil_div(d, width)
        chunk, nchunks = state_plan(bh, n, d, d)
        per_slice = state_slice_tokens(width)
        return bh * tiles * tiles * sum(ceil_div(min(chunk, n - c * chunk), per_slice) for c in range(nchunks))
    if p.kernel == "la_apply_async_kernel":
        width = apply_tile_width(d, d)
        return bh * ceil_div(d, width) * ceil_div(n, apply_item_tokens(width)) * ceil_div(d, width)
    return 0


def ring_groups(p: Pass, bh: int, n: int, d: int) -> int:
    """Iterations of the loop around a cp.async kernel's slice loop: the state pass's groups of
    state_flush_slices slices (its fp32 sums flushed into fp64 after each), apply's items (64
    tokens x one Dv tile: the epilogue that divides by z and stores the output)."""
    if p.kernel == "la_state_async_kernel":
        width = state_tile_width(d, d)
        tiles = ceil_div(d, width)
        chunk, nchunks = state_plan(bh, n, d, d)
        flush = state_flush_slices(width)
        per_slice = state_slice_tokens(width)
        groups = sum(ceil_div(ceil_div(min(chunk, n - c * chunk), per_slice), flush) for c in range(nchunks))
        return bh * tiles * tiles * groups
    if p.kernel == "la_apply_async_kernel":
        width = apply_tile_width(d, d)
        return bh * ceil_div(d, width) * ceil_div(n, apply_item_tokens(width))
    return 0


def issue_estimate_seconds(p: Pass, bh: int, n: int, d: int, sass: dict | None) -> float:
    """Instruction issue, estimated: every warp of a block runs the ring loop once per slice and
    the loop around it once per group (ring_groups); an SM issues ISSUE_PER_CLOCK warp
    instructions per clock. Not a bound in either direction: the static instruction counts (the
    SASS report's 'loop instr' and 'outer instr') include paths an iteration may skip (the next
    item's setup, bounds-checked stores), and ISSUE_PER_CLOCK is the best case. Loops further
    out (the state pass's item epilogue, once per 5 slices at N = 16,384, 78 at 262,144;
    apply's state-column load, once per head and Dv tile) are not counted. 0 without a SASS
    report or a ring."""
    width = pass_width(p, d)
    row = _sass_row(p.kernel, sass, width)
    loop = row.get("ring_loop_instructions", 0) if row else 0
    outer = row.get("ring_outer_instructions", 0) if row else 0
    per_slice = loop * WARPS
    if p.kernel == "la_state_async_kernel" and row:
        # The warps that do not multiply skip the slice's ldmatrix and mma (all of the kernel's
        # are in the ring loop); their address arithmetic is still counted.
        multiplying = state_multiplying_warps(width)
        per_slice = loop * multiplying + max(0, loop - row.get("ldsm", 0) - row.get("mma", 0)) * (WARPS - multiplying)
    warp_instructions = ring_slices(p, bh, n, d) * per_slice + ring_groups(p, bh, n, d) * outer * WARPS
    return warp_instructions / (SMS * ISSUE_PER_CLOCK * SM_CLOCK)


def pass_width(p: Pass, d: int) -> int:
    """The tile width of a pass's kernel at head dim d: the cp.async kernels' are sized to d."""
    if p.kernel == "la_state_async_kernel":
        return state_tile_width(d, d)
    if p.kernel == "la_apply_async_kernel":
        return apply_tile_width(d, d)
    return TILE


def latency_bound_seconds(p: Pass, threads: int, per_thread_bytes: int, latency_s: float) -> float:
    """Little's law: SMs x resident threads x bytes in flight per thread, every latency."""
    return p.bytes / (SMS * threads * per_thread_bytes / latency_s)


def pass_ceilings(p: Pass, bh: int, n: int, d: int, sass: dict | None, latency_ns: float,
                  variant: str = "async") -> tuple[float, float, float]:
    """Seconds of one pass: design, latency-bound and issue estimate, each the max of itself
    and the ones before it."""
    design = max(p.bytes / COPY_BW, p.flops / p.flops_rate)
    width = pass_width(p, d)
    per_thread = bytes_in_flight(p.kernel, sass, 2, one_load=variant == "one-load", width=width)
    latency = max(design, latency_bound_seconds(p, resident_threads(p.kernel, sass, width), per_thread,
                                                latency_ns * 1e-9))
    return design, latency, max(latency, issue_estimate_seconds(p, bh, n, d, sass))


def forward_ratios(bh: int, n: int, d: int, sass: dict | None, latency_ns: float = 700.0,
                   variant: str = "async") -> tuple[float, float, float]:
    """The forward's design, latency-bound and issue-estimate times over its bandwidth floor."""
    totals = [sum(c) for c in zip(*(pass_ceilings(p, bh, n, d, sass, latency_ns, variant)
                                    for p in forward_passes(bh, n, d, variant=variant)))]
    floor = floor_seconds(bh, n, d)
    return totals[0] / floor, totals[1] / floor, totals[2] / floor


def table(sass: dict | None, latency_ns: float, variant: str = "async") -> str:
    lines = ["| shape | B*H | N | D | pass | MB | GFLOP | design us (limit) | B in flight / thread | "
             "latency-bound us | issue estimate us | floor us (fwd) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, b, n, h, d in SHAPES:
        bh = b * h
        floor = floor_seconds(bh, n, d)
        total_design = total_latency = total_issue = 0.0
        for p in forward_passes(bh, n, d, variant=variant):
            t_bw, t_mma = p.bytes / COPY_BW, p.flops / p.flops_rate
            per_thread = bytes_in_flight(p.kernel, sass, 2, one_load=variant == "one-load", width=pass_width(p, d))
            design, latency, issue = pass_ceilings(p, bh, n, d, sass, latency_ns, variant)
            total_design += design
            total_latency += latency
            total_issue += issue
            lines.append(f"| {name} | {bh} | {n} | {d} | {p.name} | {p.bytes / 1e6:.1f} | {p.flops / 1e9:.1f} | "
                         f"{design * 1e6:.1f} ({'bandwidth' if t_bw >= t_mma else p.mma}) | {per_thread} | "
                         f"{latency * 1e6:.1f} | {issue * 1e6:.1f} | |")
        lines.append(f"| **{name} forward** | | | | | | | {total_design * 1e6:.1f} "
                     f"({total_design / floor:.2f}x floor) | | {total_latency * 1e6:.1f} "
                     f"({total_latency / floor:.2f}x) | {total_issue * 1e6:.1f} ({total_issue / floor:.2f}x) "
                     f"| {floor * 1e6:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", type=Path, help="JSON of scripts/sass_report.py (occupancy per kernel)")
    parser.add_argument("--latency-ns", type=float, default=700.0, help="loaded DRAM latency (default 700 ns)")
    parser.add_argument("--variant", choices=sorted(KERNELS), default="async",
                        help="async: the cp.async kernels (16-bit inputs, 16-byte aligned rows; the default); "
                             "staged: the register-staged kernels (other rows, MMFAST_CUDA_ASYNC_COPY=0); "
                             "one-load: the code before the staging change")
    args = parser.parse_args(argv)
    sass = json.loads(args.sass.read_text()) if args.sass else None
    print(f"H200 model: {SMS} SMs, {COPY_BW / 1e12:.1f} TB/s copy, {BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 (TF32 half), "
          f"{args.latency_ns:.0f} ns latency, bf16 inputs, {args.variant} kernels; occupancy from "
          f"{args.sass if sass else 'defaults (1 block/SM for the state and apply kernels)'}\n")
    print(table(sass, args.latency_ns, args.variant))
    if args.variant == "async":
        print("\nThe backward on its cp.async tile kernel (design only: bytes at the copy bandwidth or MMA "
              "FLOPs at the bf16 rate; measured on the H200, 2026-12-04, unfused at N = 256K, D = 64: 812 + 565 + "
              "802 us: 3.99x the floor below, 25.1% of the copy bandwidth):\n")
        print(backward_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
