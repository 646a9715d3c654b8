"""Probe (2026-12-03): masked_conv2d's static plan over group-by-code on pre-sliced weights
(bench_pruned.py's layers, keep 0.5, batch 8 over 5 codes) with mmfast's CPU output pool on and
off in one process (mmfast.memory.cpu_output_pool: budget 512 MiB / 0), and the minor page
faults per masked_conv2d call. 30 paired calls per setting, the settings alternating in blocks
of 5; the ratio is the median of per-pair ratios.
Run: .venv/bin/python benchmarks/probes/output_pool_ab.py [side channels ...]   (default 64 320 48 640)"""
import pathlib
import resource
import statistics
import sys
import time

import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench_pruned import group_by_code_inputs, make_layer  # noqa: E402

from mmfast.memory import cpu_output_pool  # noqa: E402
from mmfast.ops import keep_packed_weights, masked_conv2d  # noqa: E402


def timed(fn):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def probe(side: int, channels: int) -> None:
    x, weight, bias, codes, in_mask, out_mask = make_layer(side, channels, 0.5)
    work = group_by_code_inputs(x, weight, bias, codes, in_mask, out_mask)
    group_by_code = lambda: [F.conv2d(xs, w, b, padding=1) for xs, w, b in work]  # noqa: E731
    masked = lambda: masked_conv2d(x, weight, bias, codes, in_mask, out_mask, padding=1)  # noqa: E731
    results = {512: ([], [], []), 0: ([], [], [])}  # budget -> (ratios, mmfast ms, faults)
    with keep_packed_weights():
        masked(), group_by_code()
        for block in range(12):
            budget = 512 if block % 2 == 0 else 0
            cpu_output_pool(budget_mb=budget, clear=True)
            masked()  # the first call of a setting maps its block
            for _ in range(5):
                base, _ = timed(group_by_code)
                ms, faults = timed(masked)
                ratios, times, fault_counts = results[budget]
                ratios.append(ms / base), times.append(ms), fault_counts.append(faults)
    output_mb = x.shape[0] * channels * side * side * x.element_size() / 1e6
    for budget, (ratios, times, fault_counts) in results.items():
        print(f"{side}x{side} C={channels} (output {output_mb:.0f} MB), pool {'on ' if budget else 'off'}: "
              f"static plan / group-by-code {statistics.median(ratios):.3f} "
              f"(quartiles {statistics.quantiles(ratios)[0]:.3f}-{statistics.quantiles(ratios)[2]:.3f}), "
              f"{statistics.median(times):.1f} ms, {statistics.median(fault_counts):.0f} minor faults per call")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]] or [64, 320, 48, 640]
    for i in range(0, len(args), 2):
        probe(args[i], args[i + 1])
