"""Probe (2026-12-05): the native CPU ops in fp32, bf16 and fp16 at one shape each, to see what
16-bit storage costs. Prints one JSON line per (op, dtype): the median ms of `--rounds` calls
(each op's dtypes timed in shuffled rounds, after a warm-up call).

Before 7e7b02c the kernels converted fp16 to fp32 one element at a time through a branchy
scalar function (fp16 decode_linear ran 10x, decode_attention 5x the bf16 time), and before
9738bcd masked_conv2d / masked_linear left fp16 to torch's CPU conv / GEMM (no oneDNN fp16
without AVX512-FP16 or AMX-FP16: ~100x the fp32 time). Paired A/B of two builds: run this
script with PYTHONPATH pointing at each tree's python/ in alternating processes.

Run: PYTHONPATH=python .venv/bin/python benchmarks/probes/half_precision_cpu.py [--rounds 7] [--only OP]
"""
import argparse
import json
import os
import statistics

import torch

from mmfast import ops
from _rounds import time_rounds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def decode_linear_m1(dtype):  # Liquid-7B's FFN down projection at batch 1 (24,576 -> 3072), 151 MB fp32
    x, w = torch.randn(1, 24576).to(dtype), torch.randn(3072, 24576).to(dtype)
    return lambda: ops.decode_linear(x, w, backend="native")


def decode_linear_m8(dtype):  # the same at batch 8 (4 images with CFG)
    x, w = torch.randn(8, 24576).to(dtype), torch.randn(3072, 24576).to(dtype)
    return lambda: ops.decode_linear(x, w, backend="native")


def decode_attention(dtype):  # Liquid-7B's MHA (16 heads of 256), batch 8, 1024 cached tokens
    q = torch.randn(8, 1, 16, 256).to(dtype)
    k, v = (torch.randn(8, 1024, 16, 256).to(dtype) for _ in range(2))
    lengths = torch.full((8,), 1000, dtype=torch.int32)
    return lambda: ops.decode_attention(q, k, v, lengths, backend="native")


def linear_attention(dtype):  # LinFusion at SD-1.5's 64x64 latent: 4096 tokens, 8 heads of 40, batch 2
    q, k, v = (torch.randn(2, 4096, 8, 40).to(dtype) for _ in range(3))
    return lambda: ops.linear_attention(q, k, v, backend="native")


def _aptp_routing(channels):
    codes = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(0))
    masks = torch.rand(5, channels, generator=torch.Generator().manual_seed(1)) < 0.5
    return codes, masks


def masked_conv2d(dtype):  # an APTP 3x3 conv at SD-1.5's 32x32 level, 320 channels, 8 prompts, keep ~0.5
    codes, masks = _aptp_routing(320)
    x, w = torch.randn(8, 320, 32, 32).to(dtype), torch.randn(5, 320, 320, 3, 3).to(dtype)
    return lambda: ops.masked_conv2d(x, w, None, codes, masks, masks, padding=1, backend="native")


def masked_group_norm(dtype):  # its GroupNorm at the 64x64 level
    codes, masks = _aptp_routing(320)
    x = torch.randn(8, 320, 64, 64).to(dtype)
    weight, bias = torch.randn(5, 320).to(dtype), torch.randn(5, 320).to(dtype)
    return lambda: ops.masked_group_norm(x, weight, bias, 32, codes, masks, backend="native")


def vq_quantize(dtype):  # one 512 px image's 4096 latents against Liquid's 8192 x 256 codebook
    z, codebook = torch.randn(4096, 256).to(dtype), torch.randn(8192, 256).to(dtype)
    return lambda: ops.vq_quantize(z, codebook, backend="native")


CASES = [decode_linear_m1, decode_linear_m8, decode_attention, linear_attention, masked_conv2d, masked_group_norm,
         vq_quantize]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", help="one case, by name")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with torch.inference_mode():
        for case in CASES:
            if args.only and case.__name__ != args.only:
                continue
            calls = {name: case(dtype) for name, dtype in DTYPES.items()}
            for call in calls.values():
                call()  # warm-up: allocator, thread pool, packed weights
            # one slow fp16 call (the old torch fallback) can take seconds: fewer rounds suffice there
            times = time_rounds(calls, args.rounds)
            for name, values in times.items():
                print(json.dumps({"op": case.__name__, "dtype": name, "ms": round(statistics.median(values) * 1e3, 3),
                                  "isa": torch.ops.mmfast.cpu_isa()}), flush=True)


if __name__ == "__main__":
    main()
