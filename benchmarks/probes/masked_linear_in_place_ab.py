"""Probe (2026-12-02): CPU masked_linear of a code keeping every output (GEMM writing y's rows in
place) against the same call with one output masked (GEMM into scratch + scatter), paired
rounds of 5-call medians. Run: .venv/bin/python benchmarks/probes/masked_linear_in_place_ab.py"""
import statistics
import time

import torch
from mmfast.ops import masked_linear, keep_packed_weights
torch.manual_seed(0)
B, N, Cin, Cout, K = 8, 1024, 512, 512, 5
x = torch.randn(B, N, Cin)
w = torch.randn(K, Cout, Cin) / 20
b = torch.randn(K, Cout)
codes = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
in_mask = torch.rand(K, Cin) < 0.6
all_out = torch.ones(K, Cout, dtype=torch.bool)
almost = all_out.clone(); almost[:, 0] = False
def t(fn, n=5):
    fn(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3
with torch.inference_mode(), keep_packed_weights(1024):
    r = {"direct": [], "scatter": []}
    for _ in range(6):
        r["direct"].append(t(lambda: masked_linear(x, w, b, codes, in_mask, all_out)))
        r["scatter"].append(t(lambda: masked_linear(x, w, b, codes, in_mask, almost)))
    print({k: [round(v, 2) for v in vs] for k, vs in r.items()})
    print("ratio direct/scatter per round", [round(a / s, 3) for a, s in zip(r["direct"], r["scatter"])])
