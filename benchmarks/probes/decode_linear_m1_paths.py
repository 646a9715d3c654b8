"""Probe (2026-12-05): decode_linear at M = 1, its two paths side by side in one process: the
stream (weight rows one after another, stream_row) and the register blocks of three rows that
share each load of x (the M > 1 kernel), over weights whose rows are 768 to 24,576 long (a
Llama-138M's and Liquid-7B's projections) in fp32 and bf16, against a torch sum of the same
bytes; each weight is copied past the L3 (128 MB) and the copies called in turn, so that every
call reads from DRAM as in a decode step (a lone small weight would be timed from the L3). The torch-free decode kernels of this checkout are built twice with g++ (OpenMP's pool,
benchmarks/probes/_torch_free.py): "stream" with MMFAST_DECODE_STREAM_MAX_ROW_BYTES past any
row (every M = 1 call streams, as before 2026-12-05), "blocks" with 0 (none streams). Each
figure: the median over shuffled rounds of the per-round ratio to the read; the default
(16 KB of x in the accumulation type: K <= 4096 in fp32) was set from this probe.
Run: .venv/bin/python benchmarks/probes/decode_linear_m1_paths.py [rounds=15]"""
import ctypes
import os
import statistics
import sys
import tempfile

import torch

import mmfast  # noqa: F401  (registers torch.ops.mmfast: cpu_isa)
from _rounds import time_rounds
from _torch_free import build_decode_kernels

# linear_m1(w, x, y, n, k, dtype): decode_linear at M = 1 without bias, dtype 0 fp32, 2 bf16
SHIM = """
#include "mmfast/cpu/decode.h"
extern "C" void linear_m1(const void* w, const void* x, void* y, long n, long k, int dtype) {
  mmfast::DecodeLinearParams p;
  p.rows = 1, p.in_features = k, p.out_features = n, p.x = x, p.x_row_stride = k;
  p.dtype = static_cast<mmfast::DType>(dtype);
  p.weight = w, p.bias = nullptr, p.y = y;
  mmfast::cpu::decode_kernels().linear(p);
}
"""
SHAPES = [(6144, 768), (24576, 3072), (3072, 3072), (9216, 4096), (8192, 5120), (6144, 12288), (3072, 24576)]
DTYPES = {"fp32": (torch.float32, 0), "bf16": (torch.bfloat16, 2)}


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as directory:
        libs = {"stream": build_decode_kernels(directory, SHIM, ["-DMMFAST_DECODE_STREAM_MAX_ROW_BYTES=(1LL<<60)"],
                                               threads="openmp"),
                "blocks": build_decode_kernels(directory, SHIM, ["-DMMFAST_DECODE_STREAM_MAX_ROW_BYTES=0"],
                                               threads="openmp")}
        print(f"CPU ISA {torch.ops.mmfast.cpu_isa()}, {torch.get_num_threads()} threads; time / read of the same bytes")
        for n, k in SHAPES:
            for name, (dtype, code) in DTYPES.items():
                # copies of the weight past the L3 (128 MB in all), called in turn: each call reads
                # from DRAM, as in a decode step, whose weights never fit the caches
                copies = max(1, (128 << 20) // (n * k * dtype.itemsize))
                ws = torch.randn(copies, n, k).to(dtype)
                x, y = torch.randn(k).to(dtype), torch.empty(n, dtype=dtype)
                calls = [[ctypes.c_void_p(w.data_ptr()), ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()),
                          ctypes.c_long(n), ctypes.c_long(k), ctypes.c_int(code)] for w in ws]
                contenders = {"read": ws.sum}
                contenders.update({path: (lambda lib: lambda: [lib.linear_m1(*c) for c in calls])(lib)
                                   for path, lib in libs.items()})
                for fn in contenders.values():
                    fn()
                times = time_rounds(contenders, rounds)
                ratio = {path: statistics.median(a / b for a, b in zip(times[path], times["read"])) for path in libs}
                blocks_over_stream = statistics.median(a / b for a, b in zip(times["blocks"], times["stream"]))
                print(f"N={n:6d} K={k:6d} {name}: stream {ratio['stream']:.2f}x  blocks {ratio['blocks']:.2f}x  "
                      f"blocks / stream {blocks_over_stream:.2f}")


if __name__ == "__main__":
    main()
