"""DiffDIS segmentation, one view per image: per-image time and peak memory of the pipeline
variants, measured in the same run, plus the UNet / VAE-encode / VAE-decode shares.

Variants: "official-style" (fp32, mask + edge, NCHW: what the released code runs), mmfast's full
path (fp32, mask + edge, channels_last: the pipeline's default layout), mmfast mask_only (fp32,
the same mask without the edge half's up path and decode), bf16 (full and mask_only), and the
linear-attention option (top-level attn1 -> mmfast.ops.linear_attention, mask_only). mask_only's
speedup target is checked by test_mask_only_speedup_paired: against the full path in the same
dtype and layout, call by call.

Config: SD-2.1's UNet and KL-VAE structure (4 levels, 2 + 3 ResNets per block, linear-projection
transformers, GEGLU, 64-dim heads, cross-attention dim 1024, 32 GroupNorm groups) with random
weights. On the CPU it is scaled to UNet channels 64/128/256/256 (1/2/4/4 heads) and VAE channels
32/64/128/128, at 512 and 1024 px; on a GPU the full config (UNet 320/640/1280/1280, VAE
128/256/512/512) at 1024, 2048 and 4096 px (4096: mask_only with linear attention, next to the
softmax path's time and peak, or its out-of-memory). 6-view TTA: one image, bf16 at 1024 px on a
GPU, fp32 at 512 px on the CPU.
Peak memory: CPU peak RSS growth during the call (VmHWM after resetting it); GPU
max_memory_allocated during the call.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from mmfast.memory import PeakMemory

from _utils import bench_device, is_h200, median_ms, paired_ratio, paired_rounds, record_metrics, run_timed, synchronize

pytest.importorskip("diffusers")

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
UNET_CHANNELS = (320, 640, 1280, 1280) if ON_GPU else (64, 128, 256, 256)
VAE_CHANNELS = (128, 256, 512, 512) if ON_GPU else (32, 64, 128, 128)
RESOLUTIONS = (1024, 2048) if ON_GPU else (512, 1024)
HIGHEST = 4096
ROUNDS = int(os.environ.get("MMFAST_BENCH_DIFFDIS_ROUNDS", "5" if ON_GPU else "3"))
PAIRED_ROUNDS = max(ROUNDS, 5)  # the mask_only target's pairs: a median of at least 5
NCHW, CHANNELS_LAST = torch.contiguous_format, torch.channels_last
VARIANTS = {  # name: (dtype, mask_only, linear attention levels, memory format)
    "official_fp32": (torch.float32, False, 0, NCHW),
    "full_fp32": (torch.float32, False, 0, CHANNELS_LAST),
    "mask_only_fp32": (torch.float32, True, 0, CHANNELS_LAST),
    "full_bf16": (torch.bfloat16, False, 0, CHANNELS_LAST),
    "mask_only_bf16": (torch.bfloat16, True, 0, CHANNELS_LAST),
    "mask_only_linear_fp32": (torch.float32, True, 1, CHANNELS_LAST),
}
FULL_PATH = {"mask_only_fp32": "full_fp32", "mask_only_bf16": "full_bf16"}  # mask_only's like-for-like baseline
# Issue 11's H200 targets at 1024 px in bf16 (one view; the paper's 0.33 s, BiRefNet's 58-70 ms),
# and 6-view TTA (mask + edge, as the official script) in at most 0.5 s.
GPU_VIEW_TARGET_MS = {"full_bf16": 80, "mask_only_bf16": 50}
GPU_TTA_TARGET_MS = 500
ON_H200 = ON_GPU and is_h200(DEVICE)  # other GPUs: times reported, targets not graded
CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()
# oneDNN's bf16 convolutions are fast with AVX512-BF16 or AMX only (not on every AVX-512 CPU)
FAST_BF16 = ON_GPU or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
CONFIG_NAME = f"UNet {'/'.join(map(str, UNET_CHANNELS))}, VAE {'/'.join(map(str, VAE_CHANNELS))}"
_measured: dict = {}
_pipes: dict = {}


def _pipeline(dtype):
    """One random pipeline per dtype (the same weights: the bf16 one is a cast copy)."""
    if dtype not in _pipes:
        from diffusers import AutoencoderKL, DDPMScheduler

        from mmfast.models.diffdis import DiffDISPipeline
        from mmfast.testing.tiny_diffdis import SD_TURBO_SCHEDULER, sd21_unet_config, tiny_diffdis_unet

        unet = tiny_diffdis_unet(0, sd21_unet_config(UNET_CHANNELS, tuple(c // 64 for c in UNET_CHANNELS)))
        torch.manual_seed(0)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=VAE_CHANNELS, layers_per_block=2, latent_channels=4,
                            norm_num_groups=32).eval()
        embedding = torch.randn(1, 2, 1024, generator=torch.Generator().manual_seed(0))
        pipe = DiffDISPipeline(unet, vae, DDPMScheduler.from_config(SD_TURBO_SCHEDULER), embedding)
        _pipes[dtype] = pipe.to(device=DEVICE, dtype=dtype)
    return _pipes[dtype]


def _image(resolution):
    return torch.rand(3, resolution, resolution, generator=torch.Generator().manual_seed(1))


def _segment(pipe, image, resolution, mask_only):
    return pipe.segment(image, resolution=resolution, mask_only=mask_only, progress=False,
                        generator=torch.Generator(DEVICE).manual_seed(0))


def peak_memory_bytes(fn):
    """(result, peak bytes above the memory in use before the call): mmfast.memory.PeakMemory."""
    with PeakMemory(DEVICE) as meter:
        result = fn()
    return result, meter.peak_bytes


def _baseline(variant, resolution):
    """(ms, output) of a variant this row compares with: the one its own test measured earlier
    in this process, else measured here (median_ms, as every baseline), so that a row run alone
    (-k) still carries its comparison and its target."""
    if (variant, resolution) not in _measured:
        dtype, mask_only, levels, memory_format = VARIANTS[variant]
        pipe, image = _pipeline(dtype).to(memory_format=memory_format), _image(resolution)
        linfusion = pipe.enable_linear_attention(levels) if levels else None
        try:
            output = _segment(pipe, image, resolution, mask_only)
            ms = median_ms(lambda: _segment(pipe, image, resolution, mask_only), DEVICE, warmup=0, repeats=ROUNDS)
        finally:
            if linfusion is not None:
                pipe.disable_linear_attention()
        _measured[(variant, resolution)] = (ms, output)
    return _measured[(variant, resolution)]


@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_segment_one_view(benchmark, variant, resolution):
    dtype, mask_only, levels, memory_format = VARIANTS[variant]
    if dtype == torch.bfloat16 and not FAST_BF16:
        pytest.skip(f"bf16 convolutions have no fast path on this CPU ({CPU_CAPABILITY}, neither AVX512-BF16 nor "
                    "AMX): minutes per image; bf16 accuracy is checked in tests/test_diffdis.py")
    pipe, image = _pipeline(dtype).to(memory_format=memory_format), _image(resolution)
    linfusion = pipe.enable_linear_attention(levels) if levels else None
    try:
        _segment(pipe, image, resolution, mask_only)  # warm-up
        output, peak = peak_memory_bytes(lambda: _segment(pipe, image, resolution, mask_only))
        ms = run_timed(benchmark, lambda: _segment(pipe, image, resolution, mask_only), DEVICE, rounds=ROUNDS,
                       warmup=0)
    finally:
        if linfusion is not None:
            pipe.disable_linear_attention()
    _measured[(variant, resolution)] = (ms, output)
    benchmark.extra_info.update({"variant": variant, "ms": round(ms, 1), "peak_memory_mb": round(peak / 2**20, 1),
                                 "pixels": resolution, "config": CONFIG_NAME,
                                 "memory_format": "channels_last" if memory_format == CHANNELS_LAST else "nchw"})
    if variant == "official_fp32":
        return
    official = _baseline("official_fp32", resolution)
    extra = {"peak_memory_mb": round(peak / 2**20, 1), "mask_max_abs_diff_vs_official": round(
        float((output.masks[0] - official[1].masks[0]).abs().max()), 6)}
    target = target_met = None
    times = {"mmfast": ms, "official_fp32": official[0]}
    full = _baseline(FULL_PATH[variant], resolution) if variant in FULL_PATH else None
    if full is not None:
        times["full_path"] = full[0]  # gives full_path_ms and speedup_vs_full_path
        extra["mask_max_abs_diff_vs_full_path"] = round(float((output.masks[0] - full[1].masks[0]).abs().max()), 6)
    if dtype == torch.bfloat16:
        diff = (output.masks[0] - official[1].masks[0]).abs()
        extra["mask_mean_abs_diff_vs_fp32"] = round(float(diff.mean()), 5)
        target, target_met = "bf16 masks within 0.05 max / 0.01 mean of fp32", (
            float(diff.max()) < 0.05 and float(diff.mean()) < 0.01)
        if ON_H200 and resolution == 1024 and variant in GPU_VIEW_TARGET_MS:
            target += f", in at most {GPU_VIEW_TARGET_MS[variant]} ms (H200)"
            target_met = target_met and ms <= GPU_VIEW_TARGET_MS[variant]
    record_metrics(benchmark, op=f"diffdis.segment[{variant}]", shape=f"{CONFIG_NAME} {resolution}px 1 view",
                   device=DEVICE, dtype=dtype, times=times,
                   items=(1, "images"), target=target, target_met=target_met, **extra)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mask_only_speedup_paired(benchmark, dtype, resolution):
    """The mask_only target, measured in pairs: each timed mask_only call next to a full-path call,
    so both see the same machine state (a shared VM's speed drifts by tens of percent over
    minutes). Speedup: the median of the per-pair ratios (at least 5 pairs). Pairs alternate
    which runs first (paired_rounds), so neither always finds the memory the other just freed."""
    if dtype == torch.bfloat16 and not FAST_BF16:
        pytest.skip(f"bf16 convolutions have no fast path on this CPU ({CPU_CAPABILITY}, neither AVX512-BF16 nor "
                    "AMX)")
    pipe, image = _pipeline(dtype).to(memory_format=CHANNELS_LAST), _image(resolution)
    outputs = {}

    def timed(key, mask_only_flag):
        start = time.perf_counter()
        outputs[key] = _segment(pipe, image, resolution, mask_only_flag)
        synchronize(DEVICE)
        return (time.perf_counter() - start) * 1e3

    timers = {"full_path": lambda: timed("full", False), "mmfast": lambda: timed("mask_only", True)}
    for timer in timers.values():  # warm-up
        timer()
    times = paired_rounds(benchmark, timers, PAIRED_ROUNDS)
    speedup, speedups = paired_ratio(times, "full_path", "mmfast")
    diff = float((outputs["mask_only"].masks[0] - outputs["full"].masks[0]).abs().max())
    if dtype == torch.float32:
        # "Identical" up to rounding: half-batch kernels round differently, and x0 = 14.6 x_T - 14.6 eps
        # plus the min-max stretch amplify it; 1e-3 is a quarter of one 8-bit level.
        target = "mask_only >= 1.5x faster than mask + edge (same dtype and layout), same mask (max diff < 1e-3)"
        target_met = speedup >= 1.5 and diff < 1e-3
    else:  # bf16 rounds differently at half the batch: the mask's accuracy is the bf16-vs-fp32 row's target
        target = ("mask_only >= 1.5x faster than mask + edge (same dtype and layout); speed only: the bf16 mask's "
                  "accuracy is graded by the bf16-vs-fp32 row")
        target_met = speedup >= 1.5
    benchmark.group = f"diffdis-mask-only-paired-{resolution}px"
    record_metrics(benchmark, op="diffdis.segment[mask_only vs full, paired]", device=DEVICE, dtype=dtype,
                   shape=f"{CONFIG_NAME} {resolution}px 1 view, channels_last",
                   times={contender: statistics.median(ms) for contender, ms in times.items()},
                   items=(1, "images"), target=target, target_met=target_met,
                   # The row's speedup is the paired median, not the ratio of the two medians.
                   speedup_vs_full_path=round(speedup, 2), paired_speedups=[round(r, 3) for r in speedups],
                   mask_max_abs_diff_vs_full_path=round(diff, 6))


def test_segment_tta_6_views(benchmark):
    """DiffDIS's 6-view test-time augmentation (mask + edge per view, as the official script), one
    image: bf16 at 1024 px on a GPU (target at most 0.5 s), fp32 at 512 px on the CPU (reported)."""
    dtype, resolution = (torch.bfloat16, 1024) if ON_GPU else (torch.float32, RESOLUTIONS[0])
    pipe, image = _pipeline(dtype).to(memory_format=CHANNELS_LAST), _image(resolution)

    def tta():
        return pipe.segment(image, resolution=resolution, tta=True, progress=False,
                            generator=torch.Generator(DEVICE).manual_seed(0))

    tta()  # warm-up
    _, peak = peak_memory_bytes(tta)
    ms = run_timed(benchmark, tta, DEVICE, rounds=ROUNDS if ON_GPU else 2, warmup=0)
    target = target_met = None
    if ON_H200:
        target, target_met = f"6-view TTA in at most {GPU_TTA_TARGET_MS} ms (H200, bf16, 1024 px)", (
            ms <= GPU_TTA_TARGET_MS)
    record_metrics(benchmark, op="diffdis.segment[tta 6 views]", shape=f"{CONFIG_NAME} {resolution}px 6 views",
                   device=DEVICE, dtype=dtype, times={"mmfast": ms}, items=(1, "images"),
                   peak_memory_mb=round(peak / 2**20, 1), target=target, target_met=target_met)


@pytest.mark.skipif(not ON_GPU, reason="4096 px needs the GPU's memory and speed")
def test_segment_4096_mask_only_linear_attention(benchmark):
    """The issue's 4096 px target: fits in memory with the linear-attention option (time and peak),
    next to the softmax path at the same size (SDPA; its time and peak, or that it ran out of
    memory)."""
    pipe, image = _pipeline(torch.bfloat16).to(memory_format=CHANNELS_LAST), _image(HIGHEST)
    softmax = {}
    try:
        _, peak = peak_memory_bytes(lambda: _segment(pipe, image, HIGHEST, True))
        softmax_ms = median_ms(lambda: _segment(pipe, image, HIGHEST, True), DEVICE, warmup=0, repeats=2)
        softmax = {"softmax_ms": round(softmax_ms, 1), "softmax_peak_memory_gb": round(peak / 2**30, 2)}
    except torch.cuda.OutOfMemoryError:
        softmax = {"softmax": "out of memory"}
    torch.cuda.empty_cache()
    pipe.enable_linear_attention(1)
    try:
        _, peak = peak_memory_bytes(lambda: _segment(pipe, image, HIGHEST, True))
        ms = run_timed(benchmark, lambda: _segment(pipe, image, HIGHEST, True), DEVICE, rounds=2, warmup=0)
    finally:
        pipe.disable_linear_attention()
    record_metrics(benchmark, op="diffdis.segment[mask_only_linear_bf16]", shape=f"{CONFIG_NAME} 4096px 1 view",
                   device=DEVICE, dtype=torch.bfloat16, times={"mmfast": ms}, items=(1, "images"),
                   peak_memory_gb=round(peak / 2**30, 2), **softmax,
                   target="4096 px mask_only runs without running out of memory (report time, peak)",
                   target_met=True)  # reaching this line is the target: an out-of-memory error fails the test


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_component_shares(benchmark, resolution):
    """Where one fp32 view's time goes: VAE encode (image + 3 SWCI re-encodes), UNet (both halves),
    VAE decode (mask + edge)."""
    pipe, image = _pipeline(torch.float32).to(memory_format=CHANNELS_LAST), _image(resolution)
    x = (image[None] * 2 - 1).to(DEVICE)
    with torch.no_grad():
        inputs = pipe.prepare_unet_inputs(x, torch.Generator(DEVICE).manual_seed(0))

        def unet():
            return pipe.unet(inputs.sample, inputs.timestep, inputs.encoder_hidden_states,
                             rgb_latents=inputs.rgb_latents).sample

        latents = unet()
        encode_ms = median_ms(lambda: pipe.prepare_unet_inputs(x), DEVICE, warmup=1, repeats=ROUNDS)
        decode_ms = median_ms(lambda: pipe.decode(latents), DEVICE, warmup=1, repeats=ROUNDS)
        unet_ms = run_timed(benchmark, unet, DEVICE, rounds=ROUNDS, warmup=1)
    total = encode_ms + unet_ms + decode_ms
    record_metrics(benchmark, op="diffdis.unet_share", shape=f"{CONFIG_NAME} {resolution}px 1 view",
                   device=DEVICE, dtype=torch.float32, times={"mmfast": unet_ms}, vae_encode_ms=round(encode_ms, 1),
                   vae_decode_ms=round(decode_ms, 1), unet_pct=round(100 * unet_ms / total, 1),
                   vae_encode_pct=round(100 * encode_ms / total, 1), vae_decode_pct=round(100 * decode_ms / total, 1))
