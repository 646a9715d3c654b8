"""Probe (2026-12-05): decode_linear's M = 1 kernel of two source trees side by side, in one
process, on a Llama-138M decode step's weights (12 layers of fused qkv 2304 x 768, o 768 x 768,
fused gate/up 6144 x 768, down 768 x 3072, and the 32000 x 768 head: 551 MB fp32) against a
torch sum of the same bytes (the read floor). Both trees' torch-free decode kernels are built
with g++ for this CPU on OpenMP's pool (benchmarks/probes/_torch_free.py), so only the kernels
differ. BASE is a git revision (exported with git archive), the other tree is this checkout.
25 rounds in shuffled order; each figure is the median of the per-round ratios to the read.
Run: .venv/bin/python benchmarks/probes/decode_linear_ab.py [BASE=HEAD [-DNAME=VALUE ...]]: with -D flags, this
checkout built with them is a third contender (about a minute per build)"""
import ctypes
import os
import subprocess
import sys
import tempfile

import torch

import mmfast  # noqa: F401  (registers torch.ops.mmfast: cpu_isa)
from _rounds import print_ratios, time_rounds
from _torch_free import ROOT, build_decode_kernels

SHAPES = [(2304, 768), (768, 768), (6144, 768), (768, 3072)] * 12 + [(32000, 768)]
SHIM = """
#include "mmfast/cpu/decode.h"
extern "C" void linear_m1(const float* w, const float* x, float* y, long n, long k) {
  mmfast::DecodeLinearParams p;
  p.rows = 1, p.in_features = k, p.out_features = n, p.x = x, p.x_row_stride = k;
  p.weight = w, p.bias = nullptr, p.y = y;
  mmfast::cpu::decode_kernels().linear(p);
}
"""


def export_tree(revision, directory):
    """The csrc/ of `revision` under directory (git archive | tar)."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision, "csrc"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
    return directory


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    weights = [torch.randn(n, k) for n, k in SHAPES]
    total = sum(w.numel() for w in weights)
    floor_buffer = torch.ones(total)
    xs = {k: torch.randn(k) for k in {k for _, k in SHAPES}}
    ys = [torch.empty(n) for n, _ in SHAPES]
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    calls = [(ptr(w), ptr(xs[w.shape[1]]), ptr(y), ctypes.c_long(w.shape[0]), ctypes.c_long(w.shape[1]))
             for w, y in zip(weights, ys)]
    with tempfile.TemporaryDirectory() as directory:
        libs = {f"base ({base})": build_decode_kernels(directory, SHIM, [], export_tree(base, directory),
                                                       threads="openmp"),
                "this checkout": build_decode_kernels(directory, SHIM, [], threads="openmp")}
        if len(sys.argv) > 2:  # this checkout again, built with extra -D flags
            libs["this checkout " + " ".join(sys.argv[2:])] = build_decode_kernels(directory, SHIM, sys.argv[2:],
                                                                                   threads="openmp")
        contenders = {"read (floor)": floor_buffer.sum}
        for name, lib in libs.items():
            contenders[f"49 calls, {name}"] = (lambda lib: lambda: [lib.linear_m1(*c) for c in calls])(lib)
        times = time_rounds(contenders, 25)
    print(f"CPU ISA {torch.ops.mmfast.cpu_isa()}, {torch.get_num_threads()} threads")
    print_ratios(times, "read (floor)", total * 4, "the read")


if __name__ == "__main__":
    main()
