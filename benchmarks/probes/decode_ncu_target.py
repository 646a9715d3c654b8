"""A program for Nsight Compute to profile (scripts/gpu_ncu.sh decode): issue 9's two slowest
GPU kernels at their target shapes, once each inside cudaProfilerStart / cudaProfilerStop after a
warm-up:

- decode_attention, Liquid-7B's MHA layer (16 heads, head dim 256), batch 8, T = 4096 (rows of
  3/4 to all of T, bench_decode.make_cache): 49.6% of HBM measured, target 80%;
- the fused sampler, CFG over 4 pairs, V = 8192, top-k 4096, top-p 0.96: 63 us measured with
  one block per row, target 20 (on sm_90 it now runs sample_cluster_kernel;
  MMFAST_CUDA_SAMPLE_CLUSTERS=0 gives the one-block kernel).

    ncu --profile-from-start off ... python benchmarks/probes/decode_ncu_target.py

Needs a CUDA GPU and the built extension (python/ on PYTHONPATH).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_decode import make_cache  # noqa: E402

from mmfast.ops import decode_attention, sample  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("decode_ncu_target: needs a CUDA GPU", file=sys.stderr)
        return 2
    q, k_cache, v_cache, lengths = make_cache(8, 4096, 16, 16, 256)
    pairs = 4
    logits = 3 * torch.randn(2 * pairs, 8192, device="cuda")
    uniform = torch.rand(pairs, device="cuda")
    for profiled in (False, True):
        if profiled:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        decode_attention(q, k_cache, v_cache, lengths)
        sample(logits, cfg_scale=7.0, temperature=0.9, top_k=4096, top_p=0.96, uniform=uniform)
        if profiled:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
