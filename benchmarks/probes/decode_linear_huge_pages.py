"""Probe (2026-12-05): the 49 decode_linear calls of a Llama-138M decode step (the shapes of
_torch_free.LLAMA_138M_STEP_SHAPES, 551 MB fp32) with the weights on 4 KiB pages vs on transparent huge pages
(mmfast.memory.huge_page_empty, as LiquidLM.from_pretrained puts them since then), next to a
torch sum of the same bytes on each kind of page. 25 rounds in shuffled order; ratios are
medians of per-round ratios to the 4 KiB-page read.
Results: benchmarks/results/2026-12-05-cpu-amd-epyc-2core-avx512-liquid-step-huge-pages.md
Run: .venv/bin/python benchmarks/probes/decode_linear_huge_pages.py  (needs Linux with THP "madvise": under
"always" the 4 KiB baseline gets huge pages too)"""
import torch

import mmfast  # noqa: F401  (registers torch.ops.mmfast)
from _rounds import print_ratios, time_rounds
from _torch_free import LLAMA_138M_STEP_SHAPES
from mmfast.memory import huge_page_empty



def packed(huge):
    """(one buffer, the 49 weights as views into it) on huge or 4 KiB pages."""
    total = sum(n * k for n, k in LLAMA_138M_STEP_SHAPES)
    store = huge_page_empty((total,)) if huge else torch.empty(total)
    weights, offset = [], 0
    for n, k in LLAMA_138M_STEP_SHAPES:
        weights.append(store[offset:offset + n * k].view(n, k).copy_(torch.randn(n, k)))
        offset += n * k
    return store, weights


def main():
    torch.set_num_threads(2)
    linear = torch.ops.mmfast.decode_linear.default
    (small_pages, small_weights), (huge_pages, huge_weights) = packed(False), packed(True)
    xs = {768: torch.randn(1, 768), 3072: torch.randn(1, 3072)}
    contenders = {"read, 4 KiB pages": small_pages.sum, "read, huge pages": huge_pages.sum,
                  "49 calls, 4 KiB pages": lambda: [linear(xs[w.shape[1]], w, None) for w in small_weights],
                  "49 calls, huge pages": lambda: [linear(xs[w.shape[1]], w, None) for w in huge_weights]}
    times = time_rounds(contenders, 25)
    print_ratios(times, "read, 4 KiB pages", small_pages.numel() * 4, "the 4 KiB read")


if __name__ == "__main__":
    main()
