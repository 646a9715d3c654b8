"""Probe (2026-12-02): AptpUNet steps (bench_aptp_unet.py's CPU config) by the default path, then
inside keep_packed_weights, 3 steps each, 3 times in one process: the first steps after packing
run slower. Run from the repository root: .venv/bin/python benchmarks/probes/aptp_static_plan_settling.py"""
import os
import statistics
import sys
import time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch
from diffusers import UNet2DConditionModel
import bench_aptp_unet as B
from mmfast.models.aptp import AptpUNet, prune_unet, random_architecture
from mmfast.testing.tiny_aptp import perturb
from mmfast.ops import keep_packed_weights, pruned_weight_cache
torch.manual_seed(0)
base = UNet2DConditionModel(**B.CONFIG).eval()
g = torch.Generator().manual_seed(1)
experts = []
for _ in range(max(B.CODES) + 1):
    arch = random_architecture(base, (0.5, 0.9), g, skip_depth=0.0)
    e = prune_unet(base, arch); perturb(e, 0.05, g); experts.append((e.eval(), arch))
model = AptpUNet.from_experts(base, experts).eval()
del base
sample, t, text, codes = B.inputs()
f = lambda: model(sample, t, text, codes).sample
def ms(n=3):
    out = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); out.append((time.perf_counter() - t0) * 1e3)
    return out
with torch.inference_mode():
    f()
    for r in range(3):
        d = ms()
        with keep_packed_weights(4096):
            f()
            s = ms()
            kept = pruned_weight_cache()
        print("round", r, "default", [round(x) for x in d], "static", [round(x) for x in s], kept["entries"], round(kept["bytes"] / 2**20))
