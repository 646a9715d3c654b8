"""A whole APTP UNet step on an 8-prompt batch over 5 architecture codes: AptpUNet (one pass over
the mixed batch on mmfast's masked ops) vs one pass per code on the physically sliced experts
(APTP's way, each expert batched over its own prompts) vs the dense base UNet, in the same run.

Config: SD-2.1's UNet structure (4 levels, 2 + 3 ResNets per down / up block, linear-projection
transformers, GEGLU, 64-dim heads, cross-attention dim 1024, 32 GroupNorm groups), scaled on the
CPU to channels 128/256/512/512 (2/4/8/8 heads) at 32 x 32 latents (256 px, APTP's training
resolution); the full SD-2.1 config at 96 x 96 (768 px) in bf16 on a GPU. Random weights; each
expert keeps 50-90% of every layer's groups / heads (random per code, no depth gate skipped so
the MACs stay comparable) and has its own (perturbed) weights. Codes [0, 0, 1, 1, 2, 2, 3, 4].

Kept-MAC fraction: MACs of the conv and linear layers and of SDPA (AptpUNet runs it on each row's
kept heads only, CodedAttnProcessor) of each row's expert over the dense model's. Memory:
weight bytes of each form, and each contender's peak per step (peak allocated bytes on a GPU,
peak RSS growth in a fresh process on the CPU).
"""
from __future__ import annotations

import statistics
import subprocess

import pytest
import torch
from torch import nn

from mmfast.memory import PeakMemory
from mmfast.models.aptp import run_per_expert
from mmfast.ops import keep_packed_weights, pruned_weight_cache

from _utils import bench_device, is_h200, median_ms, paired_ratio, paired_rounds, record_metrics, run_timed

pytest.importorskip("diffusers")

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
ON_H200 = ON_GPU and is_h200(DEVICE)  # issue 10's whole-step target: other GPUs report times, grade nothing
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
CODES = [0, 0, 1, 1, 2, 2, 3, 4]
SD21 = dict(
    in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2, cross_attention_dim=1024, norm_num_groups=32, use_linear_projection=True)
CONFIG = dict(SD21, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
              sample_size=96) if ON_GPU else \
    dict(SD21, block_out_channels=(128, 256, 512, 512), attention_head_dim=(2, 4, 8, 8), sample_size=32)
TEXT_TOKENS = 77
REPEATS = 5 if ON_GPU else 3
PAIRED_ROUNDS = 4  # rounds of the paired CPU step (rows give medians of per-round ratios)


def count_macs(unet: nn.Module, *inputs) -> int:
    """Conv2d, Linear and SDPA MACs of one forward (the attention's q k^T and p v too: at 96 x 96
    its share is large and shrinks with the kept heads; left out, the kept-MAC fraction and the
    target derived from it came out stricter than the issue's)."""
    total = 0

    def hook(module, args, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            total += out.numel() * module.in_features

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted_sdpa(q, k, v, *args, **kwargs):  # (B, H, Nq, D) x (B, H, Nk, D) and (B, H, Nk, Dv)
        nonlocal total
        total += q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return sdpa(q, k, v, *args, **kwargs)

    handles = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    torch.nn.functional.scaled_dot_product_attention = counted_sdpa
    try:
        with torch.inference_mode():
            unet(*inputs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    return total


def weight_bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


@pytest.fixture(scope="module")
def models():
    return build_models()


def build_models():
    """(dense base UNet, [(expert, arch)] per code, AptpUNet over the experts) on DEVICE in DTYPE."""
    from diffusers import UNet2DConditionModel

    from mmfast.models.aptp import AptpUNet, prune_unet, random_architecture
    from mmfast.testing.tiny_aptp import perturb

    torch.manual_seed(0)
    base = UNet2DConditionModel(**CONFIG).eval()
    g = torch.Generator().manual_seed(1)
    experts = []
    for _ in range(max(CODES) + 1):
        arch = random_architecture(base, (0.5, 0.9), g, skip_depth=0.0)
        expert = prune_unet(base, arch)
        perturb(expert, 0.05, g)
        experts.append((expert.eval(), arch))
    model = AptpUNet.from_experts(base, experts).eval()
    if (DEVICE.type, DTYPE) != ("cpu", torch.float32):
        base, model = base.to(DEVICE, DTYPE), model.to(DEVICE, DTYPE)
        experts = [(e.to(DEVICE, DTYPE), a) for e, a in experts]
    return base, experts, model


def inputs():
    g = torch.Generator().manual_seed(2)
    size = CONFIG["sample_size"]
    sample = torch.randn(len(CODES), 4, size, size, generator=g).to(DEVICE, DTYPE)
    text = torch.randn(len(CODES), TEXT_TOKENS, CONFIG["cross_attention_dim"], generator=g).to(DEVICE, DTYPE)
    return sample, torch.tensor(500, device=DEVICE), text, torch.tensor(CODES, device=DEVICE)


def test_aptp_unet_step(benchmark, models):
    base, experts, model = models
    sample, timestep, text, codes = inputs()
    with torch.inference_mode():
        mixed = model(sample, timestep, text, codes).sample
        split = run_per_expert(experts, sample, timestep, text, codes)
    max_diff = (mixed.float() - split.float()).abs().max().item()

    one = (sample[:1], timestep, text[:1])
    dense_macs = count_macs(base, *one)
    fraction = sum(count_macs(experts[c][0], *one) for c in CODES) / (len(CODES) * dense_macs)

    def run(fn):
        def call():
            with torch.inference_mode():
                fn()
        return call

    mixed_call = run(lambda: model(sample, timestep, text, codes).sample)
    times = {"mmfast": run_timed(benchmark, mixed_call, DEVICE, rounds=REPEATS, warmup=1)}
    per_code = run(lambda: run_per_expert(experts, sample, timestep, text, codes))
    times["per_code"] = median_ms(per_code, DEVICE, 1, REPEATS)
    times["dense"] = median_ms(run(lambda: base(sample, timestep, text).sample), DEVICE, 1, REPEATS)

    memory = {"aptp_unet_weights_mib": weight_bytes([model]) / 2**20,
              "experts_weights_mib": weight_bytes(e for e, _ in experts) / 2**20,
              "dense_weights_mib": weight_bytes([base]) / 2**20}
    # The static plan: packed per-code weights kept across steps, with room for all of them (CPU:
    # each code's kept rows and columns, about the experts' size; CUDA: every code's weights in
    # the packed layout, about the stacked weights' size).
    room_mib = memory["aptp_unet_weights_mib" if ON_GPU else "experts_weights_mib"]
    with keep_packed_weights(budget_mb=int(room_mib) + 64):  # one step packs, one settles (see below)
        static_ms = median_ms(mixed_call, DEVICE, 2, REPEATS)
        static = {"static_plan_kept_mib": pruned_weight_cache()["bytes"] / 2**20}
    static.update(static_plan_ms=round(static_ms, 1),
                  static_plan_per_code_ratio=round(static_ms / times["per_code"], 3),
                  static_plan_dense_ratio=round(static_ms / times["dense"], 3))
    # Peak above the memory in use before the call, for each contender: CUDA max_memory_allocated
    # here; on the CPU the peak RSS growth in a fresh process (cpu_step_peaks: after the timed calls
    # the allocator's freed blocks stay resident here, so the growth would read 0).
    if ON_GPU:
        for name, fn in (("mixed", mixed_call), ("per_code", per_code),
                         ("dense", run(lambda: base(sample, timestep, text).sample))):
            with PeakMemory(DEVICE) as meter:
                fn()
            memory[f"{name}_peak_mib"] = meter.peak_bytes / 2**20
    else:
        try:
            peaks = cpu_step_peaks()
        except (RuntimeError, subprocess.TimeoutExpired) as error:  # the timings above still make a row
            peaks, static["peak_memory_error"] = {}, str(error)[-500:]
        memory.update({f"{name}_peak_mib": peak / 2**20 for name, peak in peaks.items() if peak is not None})
    # The whole-step target is an H200 one; elsewhere the step is measured, not judged.
    target = met = None
    if ON_H200:
        target = f"<= kept-MAC fraction + 0.05 = {fraction + 0.05:.2f}x dense and faster than one pass per code"
        met = times["mmfast"] <= (fraction + 0.05) * times["dense"] and times["mmfast"] < times["per_code"]
        static["static_plan_target_met"] = (static_ms <= (fraction + 0.05) * times["dense"]
                                            and static_ms < times["per_code"])
    shape = f"{'SD-2.1 96x96' if ON_GPU else 'scaled SD-2.1 32x32'} B=8 codes=5"
    record_metrics(benchmark, op="AptpUNet step", shape=shape, device=DEVICE, dtype=DTYPE, times=times,
                   flops=2 * fraction * dense_macs * len(CODES),
                   target=target, target_met=met, kept_mac_fraction=round(fraction, 3),
                   dense_ratio=round(times["mmfast"] / times["dense"], 3), max_diff_vs_experts=f"{max_diff:.2e}",
                   **{k: round(v, 1) for k, v in memory.items()}, **static)


_PEAK_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import bench_aptp_unet as bench
from mmfast.memory import PeakMemory
from mmfast.models.aptp import run_per_expert
torch.set_num_threads(int(sys.argv[2]))
base, experts, model = bench.build_models()
sample, timestep, text, codes = bench.inputs()
calls = {"mixed": lambda: model(sample, timestep, text, codes).sample,
         "per_code": lambda: run_per_expert(experts, sample, timestep, text, codes),
         "dense": lambda: base(sample, timestep, text).sample}
peaks = {}
with torch.inference_mode():
    for name, call in calls.items():
        call()  # first-call caches (oneDNN primitives, plans) are not the step's memory
        with PeakMemory("cpu") as meter:
            call()
        peaks[name] = meter.peak_bytes
print(json.dumps(peaks))
"""


def cpu_step_peaks() -> dict:
    """Peak RSS growth (bytes) of one step of each contender, each after a warm-up call, in a fresh
    process whose malloc returns freed blocks above 64 KiB to the system (so the resident set
    follows the live tensors) and with mmfast's CPU output pool off (its kept blocks would hide
    the outputs' pages). None where /proc/self/clear_refs is not writable."""
    import json
    import os
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MMFAST_CPU_OUTPUT_POOL_MB="0")
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, os.path.dirname(os.path.abspath(__file__)),
                             str(torch.get_num_threads())], env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"bench_aptp_unet: the peak-memory process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(ON_GPU, reason="the CPU step measured in rounds (the GPU rows are stable)")
def test_aptp_unet_step_paired(benchmark, models):
    """The same step in rounds: each round times the static plan (entered per round; its first
    call packs and its second settles, both untimed: right after packing ~1.7 GB, a step runs up
    to 1.5x slower while the allocator finds new pages for the activations), one pass per expert
    and the dense UNet, then the default mixed pass,
    so all see the same machine state (this VM's speed drifts by tens of percent between calls).
    Ratios: medians of per-round ratios."""
    base, experts, model = models
    sample, timestep, text, codes = inputs()

    def timer(fn):
        def ms():
            with torch.inference_mode():
                return median_ms(fn, DEVICE, warmup=0, repeats=1)
        return ms

    mixed = lambda: model(sample, timestep, text, codes).sample  # noqa: E731
    room_mib = int(weight_bytes(e for e, _ in experts) / 2**20) + 64

    def static_plan_ms():
        with torch.inference_mode(), keep_packed_weights(budget_mb=room_mib):
            return median_ms(mixed, DEVICE, warmup=2, repeats=1)

    # The static plan first: its ~1.7 GB come and go two timers before the default pass.
    timers = {"static_plan": static_plan_ms,
              "per_code": timer(lambda: run_per_expert(experts, sample, timestep, text, codes)),
              "dense": timer(lambda: base(sample, timestep, text).sample), "mmfast": timer(mixed)}
    for name in ("per_code", "dense", "mmfast"):  # warm-up: oneDNN primitives, scratch buffers
        timers[name]()
    times = paired_rounds(benchmark, timers, PAIRED_ROUNDS)
    ratios = {f"{a}_{b}_ratio": paired_ratio(times, a, b) for a in ("mmfast", "static_plan")
              for b in ("per_code", "dense")}
    ratios["static_plan_mmfast_ratio"] = paired_ratio(times, "static_plan", "mmfast")
    benchmark.group = "aptp-unet-step-paired"
    record_metrics(benchmark, op="AptpUNet step[paired]", shape="scaled SD-2.1 32x32 B=8 codes=5", device=DEVICE,
                   dtype=DTYPE, times={name: statistics.median(ms) for name, ms in times.items()},
                   **{name: round(median, 3) for name, (median, _) in ratios.items()},
                   **{f"{name}_rounds": [round(r, 3) for r in rounds] for name, (_, rounds) in ratios.items()})
