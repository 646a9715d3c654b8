"""Probe (2026-12-03): decode_attention on the CPU with one KV head per task (the layout before
this date) against tasks that read a block of KV heads (up to kBlockBytes = 4 KB of each token's
cache row: one head's rows alone are H_kv x D apart, a TLB miss per token and row). Builds the
torch-free decode kernels twice with g++ (-DMMFAST_DECODE_ATTENTION_BLOCK_BYTES=1, and the
default) into a temporary directory and times both in this process, next to the installed
torch.ops.mmfast.decode_attention, on benchmarks/bench_decode.py's CPU shapes (fp32, every row
at its full length): 12 rounds in shuffled order, median of per-round ratios. Results must be
bitwise equal (each head's sums are its own), and the probe asserts it. The built variants run
on plain std::threads (tests/cpp/parallel_threads.cpp: one per core up to 4, spawned per call).
Results: benchmarks/results/2026-12-03-cpu-amd-epyc-2core-avx2-decode-attention-head-block.md.
Run: .venv/bin/python benchmarks/probes/decode_attention_head_block.py  (about a minute to build)"""
import ctypes
import os
import random
import statistics
import tempfile
import time

import torch

import mmfast  # noqa: F401  (registers torch.ops.mmfast)
from _torch_free import build_decode_kernels

VARIANTS = {"one head per task": ["-DMMFAST_DECODE_ATTENTION_BLOCK_BYTES=1"], "head blocks (default)": []}
# name, batch, heads, kv heads, head dim, tokens
SHAPES = [("liquid-7b-mha B1 T1024", 1, 16, 16, 256, 1024), ("liquid-7b-mha B8 T1024", 8, 16, 16, 256, 1024),
          ("liquid-7b-mha B8 T4096", 8, 16, 16, 256, 4096), ("llama3-gqa B8 T4096", 8, 32, 8, 128, 4096)]
ROUNDS = 12
SHIM = """
#include <cmath>
#include "mmfast/cpu/decode.h"
extern "C" long attention(float* q, float* k, float* v, float* out, const int* lengths, long b, long h, long h_kv,
                          long d, long t) {
  mmfast::DecodeAttentionParams p;
  p.batch = b, p.queries = 1, p.heads = h, p.kv_heads = h_kv, p.head_dim = d, p.max_tokens = t;
  p.q = {q, h * d, h * d, d};
  p.out = {out, h * d, h * d, d};
  p.k_cache = {k, t * h_kv * d, h_kv * d, d};
  p.v_cache = {v, t * h_kv * d, h_kv * d, d};
  p.cache_seqlens = lengths;
  p.scale = 1.0 / std::sqrt(double(d));
  return mmfast::cpu::decode_kernels().attention(p);
}
"""


def time_shape(libraries, name, batch, heads, kv_heads, dim, tokens):
    q, out = torch.randn(batch, 1, heads, dim), torch.empty(batch, 1, heads, dim)
    k, v = torch.randn(batch, tokens, kv_heads, dim), torch.randn(batch, tokens, kv_heads, dim)
    lengths = torch.full((batch,), tokens, dtype=torch.int32)
    args = [ctypes.c_void_p(t.data_ptr()) for t in (q, k, v, out, lengths)]
    args += [ctypes.c_long(x) for x in (batch, heads, kv_heads, dim, tokens)]
    contenders = {label: (lambda lib: lambda: lib.attention(*args))(lib) for label, lib in libraries.items()}
    contenders["installed op"] = lambda: out.copy_(torch.ops.mmfast.decode_attention(q, k, v, lengths, dim ** -0.5,
                                                                                     0.0, 0))
    times, expected = {label: [] for label in contenders}, None
    for _ in range(ROUNDS):
        for label in random.sample(list(contenders), len(contenders)):
            start = time.perf_counter()
            contenders[label]()
            times[label].append(time.perf_counter() - start)
            expected = out.clone() if expected is None else expected
            assert torch.equal(out, expected), f"{label}: not bitwise equal to the first contender"
    base = next(iter(contenders))
    gigabytes = 2 * batch * tokens * kv_heads * dim * 4 / 1e9
    for label in contenders:
        median = statistics.median(times[label])
        ratio = statistics.median(a / b for a, b in zip(times[base], times[label]))
        print(f"| {name} | {label} | {median * 1e3:.2f} | {gigabytes / median:.1f} | {ratio:.2f}x |")


def main():
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as directory:
        libraries = {label: build_decode_kernels(directory, SHIM, defines) for label, defines in VARIANTS.items()}
        print(f"CPU ISA {torch.ops.mmfast.cpu_isa()}, {ROUNDS} rounds, fp32")
        print("| shape | variant | median ms | GB/s of K+V | speed-up over one head per task (median of pairs) |")
        print("|---|---|---|---|---|")
        for shape in SHAPES:
            time_shape(libraries, *shape)


if __name__ == "__main__":
    main()
