"""Probe (2026-12-03): how close decode_linear at M = 1 comes to this machine's read bandwidth
over the weights of a Llama-138M decode step (12 layers of fused qkv 2304 x 768, o 768 x 768,
fused gate/up 6144 x 768, down 768 x 3072, and the 32000 x 768 head: 551 MB fp32), in one
process: a sum over one buffer of that size (the read floor), one decode_linear call over one
matrix of that size, the 49 per-layer calls of a step, and 49 sums over the same weights.
25 rounds; each figure is the median of the per-round ratios to the floor's read.
Run: .venv/bin/python benchmarks/probes/decode_linear_vs_read.py"""
import torch

import mmfast  # noqa: F401  (registers torch.ops.mmfast)
from _rounds import print_ratios, time_rounds
from _torch_free import LLAMA_138M_STEP_SHAPES



def main():
    torch.set_num_threads(2)
    linear = torch.ops.mmfast.decode_linear.default
    weights = [torch.randn(n, k) for n, k in LLAMA_138M_STEP_SHAPES]
    total = sum(w.numel() for w in weights)
    one_matrix, floor_buffer = torch.randn(total // 768, 768), torch.ones(total)
    x = {768: torch.randn(1, 768), 3072: torch.randn(1, 3072)}
    contenders = {
        "read (floor)": floor_buffer.sum,
        "one call": lambda: linear(x[768], one_matrix, None),
        "49 calls": lambda: [linear(x[w.shape[1]], w, None) for w in weights],
        "49 sums": lambda: [w.sum() for w in weights],
    }
    times = time_rounds(contenders, 25, shuffle=False)
    print_ratios(times, "read (floor)", total * 4, "the read")


if __name__ == "__main__":
    main()
