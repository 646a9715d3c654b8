#!/usr/bin/env python3
"""Performance model of the CUDA linear-attention forward on an H200, pass by pass.

    python scripts/la_perf_model.py [--sass build/sass-report.json] [--latency-ns 700]

For each shape of the GPU benchmark set (benchmarks/bench_linear_attention.py) and the
large-N shapes of issue 14, and for each pass of the forward as csrc/include/mmfast/cuda/
linear_attention/ launches it today (state -> reduce when split -> apply), it prints:

  bytes     DRAM traffic: token tensors read once (the Dk/Dv tiles that re-read them run
            back to back and hit L2), fp32 split-N partials written and read back, the
            state read once per bh, the output written;
  FLOPs     the MMA work the kernels issue: 64 x 64 tiles, so D = 40 does (64/40)^2 = 2.56x
            the useful work, plus phi / normalisation (negligible);
  design    max(bytes / 4.3 TB/s, FLOPs / 395 TFLOP/s): what the pass could reach with enough
            loads in flight (TF32 WMMA: half the 790 bf16 TFLOP/s measured on these machines;
            copy bandwidth 4.3 TB/s measured, both KINDS.md of the device library);
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

The latency figure is a model, not a measurement: the loaded DRAM latency on Hopper is about
600-900 ns (--latency-ns); the ratio to the floor is what the redesign of issue 14 must bring
to <= 1.3x (N = 16,384) and <= 1.15x (N = 262,144). Only a GPU run measures it.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from linear_attention_shapes import GPU_SHAPES  # noqa: E402

SMS = 132                 # H200 multiprocessors
COPY_BW = 4.3e12          # B/s, device-to-device copy measured on the lent H200s
TF32_FLOPS = 790e12 / 2   # dense TF32 WMMA: half the measured bf16 rate
TILE = 64                 # kTile (csrc/include/mmfast/cuda/tile_gemm.cuh)
BK = 32                   # kBK: tokens per staged slice
THREADS = 256             # kThreads
MIN_CHUNK = 256           # kMinChunk (state.cuh)
CHUNK_OVERSUB = 4         # kChunkOversub (state.cuh)
ACC_BYTES = 4             # fp32 accumulators for fp16 / bf16 / fp32 inputs

# name, B, N, H, D: the GPU benchmark shapes, then issue 14's worked example.
SHAPES = GPU_SHAPES + [("issue14-bh10", 1, 16384, 10, 64)]


@dataclass
class Pass:
    name: str
    kernel: str
    bytes: float
    flops: float


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def state_plan(bh: int, n: int, dk: int, dv: int, sms: int = SMS) -> tuple[int, int]:
    """(chunk, nchunks) as la::plan_state chooses them."""
    base = bh * ceil_div(dk, TILE) * ceil_div(dv, TILE)
    min_chunk = max(MIN_CHUNK, 2 * max(dk, dv))
    want = max(1, min(ceil_div(CHUNK_OVERSUB * sms, base), ceil_div(n, min_chunk)))
    chunk = ceil_div(ceil_div(n, want), BK) * BK
    return chunk, ceil_div(n, chunk)


def forward_passes(bh: int, n: int, d: int, elem: int = 2) -> list[Pass]:
    """The forward's launches with their DRAM bytes and issued MMA FLOPs (Dk = Dv = d)."""
    padded = ceil_div(d, TILE) * TILE
    _, nchunks = state_plan(bh, n, d, d)
    state_elems = d * d + d
    mma = 2.0 * bh * n * padded * padded
    partials = bh * nchunks * state_elems * ACC_BYTES if nchunks > 1 else 0
    final = bh * state_elems * ACC_BYTES
    passes = [Pass("state", "la_state_kernel", bh * n * 2 * d * elem + (partials or final), mma)]
    if nchunks > 1:
        passes.append(Pass(f"reduce ({nchunks} chunks)", "la_state_reduce_kernel", partials + final, 0.0))
    passes.append(Pass("apply", "la_apply_kernel", bh * n * 2 * d * elem + final, mma))
    return passes


def floor_seconds(bh: int, n: int, d: int, elem: int = 2) -> float:
    return bh * n * 4 * d * elem / COPY_BW


# Token loads one thread has in flight in each pass's streaming loop: kStagePerThread (8) per
# streamed operand (state: k and v; apply: q, the state operand comes from L2); the reduce's
# partial-sum loop, unrolled by the compiler, keeps 4 (SASS report).
TOKEN_LOADS_IN_FLIGHT = {"la_state_kernel": 16, "la_apply_kernel": 8, "la_state_reduce_kernel": 4}
# The configuration the bf16 benchmarks run: elu(x) + 1 on TF32 tensor cores.
BENCH_CONFIG = "bf16, FeatureMap=1, true"
DEFAULT_BLOCKS_PER_SM = {"la_state_kernel": 1, "la_apply_kernel": 1, "la_state_reduce_kernel": 8}


def resident_threads(kernel: str, sass: dict | None) -> int:
    """Threads per SM: blocks/SM of the SASS report's occupancy for the benchmarked
    configuration (the reduce is instantiated on the fp32 accumulator) x 256."""
    want = "f32" if "reduce" in kernel else BENCH_CONFIG
    for row in (sass or {}).get("kernels", []):
        if row["kernel"] == kernel and row["template_args"] == want:
            return row["blocks_per_sm"] * THREADS
    return DEFAULT_BLOCKS_PER_SM[kernel] * THREADS


def latency_bound_seconds(p: Pass, threads: int, elem: int, latency_s: float, one_load: bool = False) -> float:
    """Little's law: SMs x resident threads x bytes in flight per thread, every latency."""
    loads = 1 if one_load else TOKEN_LOADS_IN_FLIGHT[p.kernel]
    in_flight = SMS * threads * loads * (ACC_BYTES if "reduce" in p.kernel else elem)
    return p.bytes / (in_flight / latency_s)


def table(sass: dict | None, latency_ns: float, one_load: bool = False) -> str:
    lines = ["| shape | B*H | N | D | pass | MB | GFLOP | design us (limit) | latency-bound us | floor us (fwd) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, b, n, h, d in SHAPES:
        bh = b * h
        floor = floor_seconds(bh, n, d)
        total_design = total_latency = 0.0
        for p in forward_passes(bh, n, d):
            t_bw, t_mma = p.bytes / COPY_BW, p.flops / TF32_FLOPS
            design = max(t_bw, t_mma)
            latency = latency_bound_seconds(p, resident_threads(p.kernel, sass), 2, latency_ns * 1e-9, one_load)
            total_design += design
            total_latency += max(design, latency)
            lines.append(f"| {name} | {bh} | {n} | {d} | {p.name} | {p.bytes / 1e6:.1f} | {p.flops / 1e9:.1f} | "
                         f"{design * 1e6:.1f} ({'bandwidth' if t_bw >= t_mma else 'TF32 MMA'}) | "
                         f"{max(design, latency) * 1e6:.1f} | |")
        lines.append(f"| **{name} forward** | | | | | | | {total_design * 1e6:.1f} "
                     f"({total_design / floor:.2f}x floor) | {total_latency * 1e6:.1f} ({total_latency / floor:.1f}x) "
                     f"| {floor * 1e6:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", type=Path, help="JSON of scripts/sass_report.py (occupancy per kernel)")
    parser.add_argument("--latency-ns", type=float, default=700.0, help="loaded DRAM latency (default 700 ns)")
    parser.add_argument("--one-load", action="store_true",
                        help="model the earlier code: one load in flight per thread")
    args = parser.parse_args(argv)
    sass = json.loads(args.sass.read_text()) if args.sass else None
    print(f"H200 model: {SMS} SMs, {COPY_BW / 1e12:.1f} TB/s copy, {TF32_FLOPS / 1e12:.0f} TFLOP/s TF32, "
          f"{args.latency_ns:.0f} ns latency, bf16 inputs; occupancy from "
          f"{args.sass if sass else 'defaults (1 block/SM for the state and apply kernels)'}"
          f"{'; one load in flight per thread' if args.one_load else ''}\n")
    print(table(sass, args.latency_ns, args.one_load))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
