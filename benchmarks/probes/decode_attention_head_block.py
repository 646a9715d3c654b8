"""Probe (2026-12-03): decode_attention on the CPU with one KV head per task (the layout before
this date) against tasks that read a block of KV heads (up to kBlockBytes = 4 KB of each token's
cache row: one head's rows alone are H_kv x D apart, a TLB miss per token and row). Builds the
torch-free decode kernels twice with g++ (-DMMFAST_DECODE_ATTENTION_BLOCK_BYTES=1, and the
default) into a temporary directory and times both in this process, next to the installed
torch.ops.mmfast.decode_attention, on benchmarks/bench_decode.py's CPU shapes (fp32, every row
at its full length): 12 rounds in shuffled order, median of per-round ratios. Results must be
bitwise equal (each head's sums are its own), and the probe asserts it.

--old-root DIR times an earlier commit's kernels (a `git worktree add DIR COMMIT`: only its
sources are used) against this tree's instead. --threads std runs the built variants on plain
std::threads spawned per call (tests/cpp/parallel_threads.cpp), as the first results did; the
default, openmp, on OpenMP's pool, as the op's glue (no spawn cost in the timings). Each call
reads a cold cache: K / V are rotated over enough copies to exceed 96 MB (the L3 is 32 MB).
Results: benchmarks/results/2026-12-03-cpu-amd-epyc-2core-avx2-decode-attention-head-block.md
(std threads, one copy) and -decode-attention-token-major.md.
Run: .venv/bin/python benchmarks/probes/decode_attention_head_block.py  (about a minute to build)"""
import argparse
import ctypes
import math
import os
import random
import statistics
import tempfile
import time

import torch

import mmfast  # noqa: F401  (registers torch.ops.mmfast)
from _torch_free import ROOT, build_decode_kernels

# label: (defines, source root or None for this tree)
HEAD_BLOCK_VARIANTS = {"one head per task": (["-DMMFAST_DECODE_ATTENTION_BLOCK_BYTES=1"], None),
                       "head blocks (default)": ([], None)}
COLD_BYTES = 96e6
# name, batch, heads, kv heads, head dim, tokens
SHAPES = [("liquid-7b-mha B1 T1024", 1, 16, 16, 256, 1024), ("liquid-7b-mha B8 T1024", 8, 16, 16, 256, 1024),
          ("liquid-7b-mha B8 T4096", 8, 16, 16, 256, 4096), ("llama3-gqa B8 T4096", 8, 32, 8, 128, 4096)]
ROUNDS = 12
SHIM = """
#include <cmath>
#include "mmfast/cpu/decode.h"
extern "C" long attention(void* q, void* k, void* v, void* out, const int* lengths, long b, long h, long h_kv,
                          long d, long t, int dtype) {
  mmfast::DecodeAttentionParams p;
  p.dtype = static_cast<mmfast::DType>(dtype);
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


DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # mmfast::DType


def time_shape(libraries, dtype, name, batch, heads, kv_heads, dim, tokens):
    q, out = torch.randn(batch, 1, heads, dim, dtype=dtype), torch.empty(batch, 1, heads, dim, dtype=dtype)
    gigabytes = 2 * batch * tokens * kv_heads * dim * dtype.itemsize / 1e9
    copies = max(1, math.ceil(COLD_BYTES / (gigabytes * 1e9)))
    caches = [(torch.randn(batch, tokens, kv_heads, dim, dtype=dtype),
               torch.randn(batch, tokens, kv_heads, dim, dtype=dtype))] * copies
    caches[1:] = [(k.clone(), v.clone()) for k, v in caches[1:]]  # same values: outputs stay comparable
    lengths = torch.full((batch,), tokens, dtype=torch.int32)
    call = {"index": 0}

    def cache():  # the next copy, so that every call reads K / V from DRAM
        call["index"] = (call["index"] + 1) % copies
        return caches[call["index"]]

    def native(lib):
        def run():
            k, v = cache()
            args = [ctypes.c_void_p(t.data_ptr()) for t in (q, k, v, out, lengths)]
            return lib.attention(*args, *[ctypes.c_long(x) for x in (batch, heads, kv_heads, dim, tokens)],
                                 ctypes.c_int(DTYPE_CODES[dtype]))
        return run

    def installed():
        k, v = cache()
        out.copy_(torch.ops.mmfast.decode_attention(q, k, v, lengths, dim ** -0.5, 0.0, 0))

    contenders = {label: native(lib) for label, lib in libraries.items()}
    contenders["installed op"] = installed
    times, expected = {label: [] for label in contenders}, None
    for _ in range(ROUNDS):
        for label in random.sample(list(contenders), len(contenders)):
            start = time.perf_counter()
            contenders[label]()
            times[label].append(time.perf_counter() - start)
            expected = out.clone() if expected is None else expected
            assert torch.equal(out, expected), f"{label}: not bitwise equal to the first contender"
    base = next(iter(contenders))
    for label in contenders:
        median = statistics.median(times[label])
        ratio = statistics.median(a / b for a, b in zip(times[base], times[label]))
        print(f"| {name} | {label} | {median * 1e3:.2f} | {gigabytes / median:.1f} | {ratio:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-root", help="an earlier commit's worktree: time its kernels against this tree's")
    parser.add_argument("--threads", choices=("openmp", "std"), default="openmp")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="of q and the caches (16-bit caches are converted into fp32 tiles)")
    args = parser.parse_args()
    variants = HEAD_BLOCK_VARIANTS
    if args.old_root:
        variants = {f"old source ({args.old_root})": ([], args.old_root), "this source": ([], None)}
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as directory:
        libraries = {label: build_decode_kernels(directory, SHIM, defines, root=root or ROOT, threads=args.threads)
                     for label, (defines, root) in variants.items()}
        print(f"CPU ISA {torch.ops.mmfast.cpu_isa()}, {ROUNDS} rounds, {args.dtype}, {args.threads} threads")
        print(f"| shape | variant | median ms | GB/s of K+V | speed-up over {next(iter(variants))} (median of pairs) |")
        print("|---|---|---|---|---|")
        for shape in SHAPES:
            time_shape(libraries, getattr(torch, args.dtype), *shape)


if __name__ == "__main__":
    main()
