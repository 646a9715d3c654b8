"""Probe (2026-12-03): which M = 1 decode_linear stream (accumulators per row, prefetch hints
how far ahead) reads fastest on this CPU. Builds the torch-free decode kernels once per variant
(-DMMFAST_DECODE_STREAM_CHAINS / -DMMFAST_DECODE_STREAM_PREFETCH_BYTES, the ISA this CPU runs)
with g++ into a temporary directory, then times each on one 551 MB fp32 weight (a Llama-138M
decode step's bytes) in this process, next to a torch sum of the same tensor and the installed
torch.ops.mmfast.decode_linear: 15 rounds in shuffled order, median of per-round ratios to the
sum. The variants run on plain std::threads (tests/cpp/parallel_threads.cpp), one per core up
to 4. Results: benchmarks/results/2026-12-03-cpu-amd-epyc-2core-avx2-liquid-step-paired.md.
Run: .venv/bin/python benchmarks/probes/decode_stream_prefetch.py  (about a minute to build)"""
import ctypes
import os
import tempfile

import torch

import mmfast  # noqa: F401  (registers torch.ops.mmfast)
from _rounds import print_ratios, time_rounds
from _torch_free import LINEAR_M1_SHIM, build_decode_kernels

VARIANTS = [(4, 2048), (4, 1024), (4, 512), (4, 0), (8, 0), (8, 2048)]  # (chains, prefetch bytes)


def build(directory, chains, prefetch):
    return build_decode_kernels(directory, LINEAR_M1_SHIM, [f"-DMMFAST_DECODE_STREAM_CHAINS={chains}",
                                                  f"-DMMFAST_DECODE_STREAM_PREFETCH_BYTES={prefetch}"])


def main():
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    k = 768
    n = 551_000_000 // 4 // k
    weight, x, y = torch.randn(n, k), torch.randn(1, k), torch.empty(n)
    args = [ctypes.c_void_p(t.data_ptr()) for t in (weight, x, y)] + [ctypes.c_long(n), ctypes.c_long(k)]
    contenders = {"torch sum": weight.sum,
                  "installed op": lambda: torch.ops.mmfast.decode_linear.default(x, weight, None)}
    with tempfile.TemporaryDirectory() as directory:
        for chains, prefetch in VARIANTS:
            lib = build(directory, chains, prefetch)
            contenders[f"{chains} chains, {prefetch} B ahead"] = (lambda lib: lambda: lib.linear_m1(*args))(lib)
        times = time_rounds(contenders, 15)
    print(f"CPU ISA {torch.ops.mmfast.cpu_isa()}, {torch.get_num_threads()} threads")
    print_ratios(times, "torch sum", n * k * 4, "the sum")


if __name__ == "__main__":
    main()
