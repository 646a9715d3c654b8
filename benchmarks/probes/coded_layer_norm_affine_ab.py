"""Probe (2026-12-02): CodedLayerNorm's per-row affine as multiply then add (before) against one
addcmul (now), paired rounds of 7-call medians. Run: .venv/bin/python benchmarks/probes/coded_layer_norm_affine_ab.py"""
import statistics
import time

import torch
import torch.nn.functional as F
torch.manual_seed(0)
B, N, C, K = 8, 1024, 512, 5
x = torch.randn(B, N, C); w = torch.randn(K, C); b = torch.randn(K, C)
codes = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
shape = (B, 1, C)
def old():
    y = F.layer_norm(x, (C,), None, None, 1e-5)
    y = y * w[codes].view(shape)
    return y + b[codes].view(shape)
def new():
    y = F.layer_norm(x, (C,), None, None, 1e-5)
    return torch.addcmul(b[codes].view(shape), y, w[codes].view(shape))
def t(fn, n=7):
    fn(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3
assert torch.allclose(old(), new(), atol=1e-6)
with torch.inference_mode():
    r = [(t(old), t(new)) for _ in range(5)]
print([(round(a, 2), round(b, 2)) for a, b in r], "ratio new/old", [round(b / a, 3) for a, b in r])
