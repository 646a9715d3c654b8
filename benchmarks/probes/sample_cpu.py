"""CPU time of mmfast.ops.sample's kernel (torch.ops.mmfast.sample, no Python wrapper) per
setting: greedy and filtered draws over a 32,000-token vocabulary (a Llama text head) and
Liquid's image sampling (CFG 7.0, temperature 0.99, top-k 4096, top-p 0.96 over 4 pairs of
8192 image-code rows, and over Liquid-7B's whole 264,192-row head). Prints one line per
setting: the median of `--repeats` calls, in microseconds.

For an A/B of two builds run it once per tree, alternating (PYTHONPATH=<tree>/python), and
compare medians across rounds: the CPU's speed drifts between minutes on these VMs."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import mmfast  # noqa: F401  (registers torch.ops.mmfast)


def settings():
    gen = torch.Generator().manual_seed(0)
    text = 3 * torch.randn(1, 32000, generator=gen)
    image = 3 * torch.randn(8, 8192, generator=gen)
    whole = 3 * torch.randn(8, 264192, generator=gen)
    half, quarter = torch.full((1,), 0.5), torch.full((4,), 0.5)
    liquid = (0.99, 4096, 0.96, 7.0)
    return {
        "greedy V=32000": (text, half, 0.0, 0, 1.0, None),
        "t=1 V=32000": (text, half, 1.0, 0, 1.0, None),
        "t=1 top-k 50 V=32000": (text, half, 1.0, 50, 1.0, None),
        "t=1 top-p 0.9 V=32000": (text, half, 1.0, 0, 0.9, None),
        "Liquid CFG 4 pairs V=8192": (image, quarter, *liquid),
        "Liquid CFG 4 pairs V=264192": (whole, quarter, *liquid),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    for name, call in settings().items():
        op = lambda: torch.ops.mmfast.sample(*call)  # noqa: E731
        for _ in range(5):
            op()
        times = []
        for _ in range(args.repeats if "264192" not in name else max(args.repeats // 10, 5)):
            start = time.perf_counter()
            op()
            times.append(time.perf_counter() - start)
        print(f"{name:32s} {1e6 * statistics.median(times):10.1f} us")


if __name__ == "__main__":
    main()
