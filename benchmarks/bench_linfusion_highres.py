"""LinFusion's ultra-high-resolution cascade (mmfast.models.linfusion.generate_highres): time and
peak memory, measured against the memory model's prediction and against softmax attention.

a. test_tiny_cascade: the tiny random pipeline + LinFusion, 2 upscaling stages (64x32 -> 256x128, width x height
   px), every memory knob on. Time of the whole cascade (median after a warm-up run) and, per
   stage, size, strength, denoising steps, seconds, measured peak (total and above the stage's
   start) next to estimate_highres_memory's prediction and the ratio predicted / measured.
b. test_unet_step: one UNet step of SD-1.5 (config written out below, random weights) at 512,
   1024 and 2048 px, and 4096 px on a GPU (latents 64..512 squared, CFG batch 2), LinFusion mounted
   vs diffusers' SDPA softmax attention: median time and peak memory of each, speedup. Targets:
   LinFusion no slower than SDPA at 512 / 1024 px, at least 2x faster at 2048 px and above.
c. test_vae_decode: SD-1.5's VAE decoder (random weights) untiled vs vae_tiling "blend"
   (diffusers' tiles) vs "exact" (bands; on CUDA also with offload_device="cpu"): peak memory,
   time, tiling_error vs untiled. Tiles / bands of 64 latent px (diffusers' default), or half the
   latent side when that is smaller.
d. test_h200_16k_target (CUDA only): SD-1.5, random bf16 weights, 16384x8192 cascade 1024 -> 16K,
   strengths 0.4/0.3/0.2/0.1 of 50 steps, memory options planned with memory_budget_bytes =
   72 GB (plan_highres_memory with 10% headroom, run before and timed apart): generation seconds
   (target <= 60 s) and max peak memory (target < 80 GB), after a warm-up cascade at 1/8 the size.
   MMFAST_BENCH_HIGHRES_PREDICT=1 also records each stage's prediction for the options it ran
   with (the same traces again, after the timed run).

Gating: MMFAST_BENCH_HIGHRES=1 runs the slow cases: b at every size and c at 2048 px on the CPU
(minutes: SD-1.5 at 512 px is tens of seconds a step on one core, and softmax attention at 65,536 tokens
much more), d on a GPU. Ungated on the CPU: a, and c at 256 px (tiles of 16 latent px so the
tiling runs); on a GPU a, b, and c at 512 and 2048 px.

Measurement: every case runs in a worker (functions below, also runnable as
`python bench_linfusion_highres.py KIND JSON`) that repeats the call itself and reports the
median and the peak, measured with mmfast.memory.PeakMemory. On the CPU every worker runs in a
fresh process started with MALLOC_MMAP_THRESHOLD_=65536, so that the peak resident set follows
the live tensors (glibc otherwise keeps freed blocks resident; CPU times then include the page
faults of fresh mappings, which the small cases feel most); on CUDA b and c run in this
process (max_memory_allocated), a and d in a fresh one (their total peak is compared with a
prediction that counts only the pipeline's own weights). The `benchmark` fixture times the
mmfast variant's worker (one round: the worker's own median is the row's mmfast_ms).
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

import mmfast
from mmfast.memory import PeakMemory

from _utils import bench_device, is_h200, median_ms, record_metrics, synchronize

pytest.importorskip("diffusers")

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
ON_H200 = ON_GPU and is_h200(DEVICE)  # issue 12's UNet-step targets are the H200's
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BACKEND = "native" if mmfast._backend.native_available("linear_attention", DEVICE) else "reference"
# the H200's targets, graded on mmfast's kernels only (the reference fallback is reported, not graded)
GRADED = ON_H200 and BACKEND == "native"
HIGHRES = os.environ.get("MMFAST_BENCH_HIGHRES") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "a photo of an astronaut riding a horse on mars"
MB = 2**20

# SD-1.5's UNet and VAE (runwayml/stable-diffusion-v1-5 unet/ and vae/ config.json), random weights.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
# CLIP ViT-L/14's text tower (SD-1.5's text encoder) over the tiny character-level tokenizer.
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

# a. the tiny cascade: 32x64 -> 64x128 -> 128x256 px (the tiny VAE is 2x: 8192 tokens at the last
# stage), every memory knob on with 2-4 chunks / tiles per side
TINY_HEIGHT, TINY_WIDTH, TINY_STRENGTHS, TINY_STEPS = 128, 256, (0.4, 0.2), 10
TINY_OPTIONS = dict(cfg_batch_size=1, token_chunk_size=2048, ff_chunk_size=2048, vae_tiling="blend",
                    vae_tile_size=32)
TINY_ROUNDS = 3
# b. one UNet step
UNET_PIXELS = (512, 1024, 2048, 4096) if ON_GPU else (512, 1024, 2048)  # 4096: "2048 px and above"
UNET_ROUNDS = int(os.environ.get("MMFAST_BENCH_HIGHRES_ROUNDS", "5" if ON_GPU else "2"))
# c. the VAE decode: (pixels, gated on the CPU)
VAE_CASES = ((512, False), (2048, False)) if ON_GPU else ((256, False), (2048, True))
VAE_ROUNDS = 6 if ON_GPU else 1  # the first call measures the peak, the rest the time
# d. the H200 target
# 80 GB (decimal, the figure); planned with 10% headroom for what the model does not see
# (CUDA context, cuDNN/cuBLAS workspaces, allocator fragmentation).
TARGET_HEIGHT, TARGET_WIDTH, TARGET_STEPS, TARGET_BUDGET = 8192, 16384, 50, 80 * 10**9
PLAN_BUDGET = int(0.9 * TARGET_BUDGET)
TARGET_SECONDS = 60.0


# --- models --------------------------------------------------------------------------------


def _build(cls, config, dtype):
    """A randomly initialised diffusers model, initialised directly on the bench device."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = cls(**config)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


@functools.lru_cache(maxsize=1)
def sd15_unet():
    from diffusers import UNet2DConditionModel

    return _build(UNet2DConditionModel, SD15_UNET, DTYPE)


@functools.lru_cache(maxsize=1)
def sd15_vae():
    from diffusers import AutoencoderKL

    return _build(AutoencoderKL, SD15_VAE, DTYPE)


def sd15_pipeline(dtype):
    """A StableDiffusionPipeline with SD-1.5's UNet, VAE and text tower (random weights) and the tiny
    pipeline's character-level tokenizer and DDIM scheduler (SD-1.5's betas)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmfast.testing.tiny_diffusers import tiny_pipeline

    tiny = tiny_pipeline(seed=0)
    tokenizer = tiny.tokenizer
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SD15_TEXT)
    pipe = StableDiffusionPipeline(
        vae=_build(AutoencoderKL, SD15_VAE, dtype), text_encoder=_build(CLIPTextModel, {"config": text_config}, dtype),
        tokenizer=tokenizer, unet=_build(UNet2DConditionModel, SD15_UNET, dtype), scheduler=tiny.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(DEVICE)


# --- workers: one measured case each, JSON in and out ------------------------------------------


def _mb(count):
    return None if count is None else round(count / MB, 1)


def _timed(fn, rounds):
    """(median ms, last result) of `rounds` synchronised calls."""
    times, result = [], None
    for _ in range(rounds):
        synchronize(DEVICE)
        start = time.perf_counter()
        result = fn()
        synchronize(DEVICE)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def _stage_rows(stages, predicted=None):
    """Per stage: size, strength, steps, seconds, options, measured peaks and, given the memory
    model's StageMemory per stage, the prediction and predicted / measured."""
    rows = []
    for stage, model in zip(stages, predicted or [None] * len(stages)):
        measured_stage, measured_peak = stage.stage_memory_bytes, stage.peak_memory_bytes
        row = {
            "stage": stage.index, "size": f"{stage.width}x{stage.height}", "strength": stage.strength,
            "denoising_steps": stage.denoising_steps, "seconds": round(stage.seconds, 3),
            "options": {key: value for key, value in vars(stage.options).items() if value not in (None, "none")},
            "peak_mb": _mb(measured_peak), "stage_peak_mb": _mb(measured_stage),
        }
        if model is not None:
            row.update({
                "predicted_peak_mb": _mb(model.peak_bytes), "predicted_stage_mb": _mb(model.stage_bytes),
                "predicted_over_measured_peak": round(model.peak_bytes / measured_peak, 3) if measured_peak else None,
                "predicted_over_measured_stage": round(model.stage_bytes / measured_stage, 3)
                if measured_stage else None,
            })
        rows.append(row)
    return rows


def cascade_worker(height, width, strengths, steps, options, rounds):
    """a. The tiny cascade: a warm-up run, `rounds` timed runs; stage peaks of the last one."""
    from mmfast.models.linfusion import LinFusion, MemoryOptions, estimate_highres_memory, generate_highres
    from mmfast.testing.tiny_diffusers import tiny_pipeline

    pipe = tiny_pipeline(seed=0).to(DEVICE)
    LinFusion.construct_for(pipe, load_pretrained=False)
    memory = MemoryOptions(**options)

    def run():
        with mmfast.use_backend(BACKEND):
            return generate_highres(pipe, PROMPT, height=height, width=width, strengths=strengths, steps=steps,
                                    memory=memory, generator=torch.Generator().manual_seed(0), progress=False,
                                    return_stages=True)

    run()  # first-call library caches (oneDNN, cuBLAS) are not the cascade's memory
    ms, out = _timed(run, rounds)
    start = time.perf_counter()
    predicted = estimate_highres_memory(pipe, height=height, width=width, strengths=strengths, options=memory)
    return {"ms": ms, "stages": _stage_rows(out.stages, predicted),
            "predict_seconds": round(time.perf_counter() - start, 2)}


def unet_worker(impl, pixels, rounds):
    """b. One SD-1.5 UNet step (CFG batch 2): a peak-measured call (also the warm-up), then `rounds`."""
    from mmfast.models.linfusion import LinFusion

    unet, latent = sd15_unet(), pixels // 8
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, latent, latent, generator=generator).to(DEVICE, DTYPE)
    text = torch.randn(2, 77, SD15_UNET["cross_attention_dim"], generator=generator).to(DEVICE, DTYPE)
    timestep = torch.tensor(500, device=DEVICE)

    def run():
        with torch.inference_mode(), mmfast.use_backend(BACKEND):
            return unet(sample, timestep, text).sample

    linfusion = LinFusion.construct_for(unet, load_pretrained=False) if impl == "linfusion" else None
    try:
        with PeakMemory(DEVICE) as meter:
            out = run()
        finite = bool(torch.isfinite(out).all())
        del out
        ms, _ = _timed(run, rounds)
    finally:
        if linfusion is not None:
            linfusion.unmount()
    return {"ms": ms, "peak_bytes": meter.peak_bytes, "start_bytes": meter.start_bytes, "finite": finite}


def vae_worker(pixels, tile, rounds):
    """c. SD-1.5's VAE decode untiled, "blend" and "exact" (tile: latent px; on CUDA also "exact" with
    offload_device="cpu"): a peak-measured call, then the median of rounds - 1 more (rounds=1: the
    peak-measured call's time)."""
    from mmfast.models import vae_tiling

    vae, latent = sd15_vae(), pixels // 8
    latents = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)
    results, reference = {}, None
    variants = {"none": {}, "blend": {"mode": "blend", "tile_size": tile},
                "exact": {"mode": "exact", "tile_size": tile}}
    if DEVICE.type == "cuda":  # full-size activations in host memory: one band of each layer on the GPU
        variants["exact_offload"] = {"mode": "exact", "tile_size": tile, "offload_device": "cpu"}
    for mode, kwargs in variants.items():

        def run():
            with torch.inference_mode():
                return vae_tiling.decode_latents(vae, latents, **kwargs)

        start = time.perf_counter()
        with PeakMemory(DEVICE) as meter:
            image = run()
            synchronize(DEVICE)
        times = [(time.perf_counter() - start) * 1e3]
        if rounds > 1:
            times.append(median_ms(run, DEVICE, warmup=0, repeats=rounds - 1))
        results[mode] = {"ms": times[-1], "peak_bytes": meter.peak_bytes, "start_bytes": meter.start_bytes}
        if reference is None:
            reference = image
        else:
            results[mode]["error"] = vae_tiling.tiling_error(reference, image)
        del image
    return results


def h200_worker(height, width, steps, budget_bytes, predict):
    """d. The 16K cascade on SD-1.5 (random bf16 weights), memory options planned for the budget."""
    from mmfast.models.linfusion import DEFAULT_STRENGTHS, LinFusion, generate_highres, plan_highres_memory
    from mmfast.models.linfusion.highres_memory import estimate_stage_memory

    pipe = sd15_pipeline(torch.bfloat16)
    LinFusion.construct_for(pipe, load_pretrained=False)

    def run(h, w, strengths, n, plan):
        with mmfast.use_backend(BACKEND):
            return generate_highres(pipe, PROMPT, height=h, width=w, strengths=strengths, steps=n, memory=plan,
                                    generator=torch.Generator().manual_seed(0), progress=False, return_stages=True)

    def plan(h, w, strengths):
        return plan_highres_memory(pipe, height=h, width=w, budget_bytes=budget_bytes, strengths=strengths)

    run(height // 8, width // 8, (0.5,), 4, plan(height // 8, width // 8, (0.5,)))  # warm-up (2048x1024 for 16K)
    start = time.perf_counter()
    options = plan(height, width, DEFAULT_STRENGTHS)  # planned before the run, timed apart
    plan_seconds = time.perf_counter() - start
    synchronize(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    start = time.perf_counter()
    out = run(height, width, DEFAULT_STRENGTHS, steps, options)
    synchronize(DEVICE)
    seconds = time.perf_counter() - start
    # reserved, not allocated: the caching allocator's whole hold is what the GPU must have
    process_peak = max(torch.cuda.max_memory_allocated(DEVICE), torch.cuda.max_memory_reserved(DEVICE))
    start = time.perf_counter()
    predicted = None
    if predict:  # the options each stage ran with, predicted again (the planner's traces are not kept)
        predicted = [estimate_stage_memory(pipe, index=s.index, height=s.height, width=s.width, options=s.options)
                     for s in out.stages]
    return {"seconds": seconds, "process_peak_bytes": process_peak, "stages": _stage_rows(out.stages, predicted),
            "stage_seconds": sum(s.seconds for s in out.stages),
            "max_stage_peak_bytes": max(s.peak_memory_bytes for s in out.stages),
            "predict_seconds": round(time.perf_counter() - start, 2) if predict else None,
            "plan_seconds": round(plan_seconds, 2)}


WORKERS = {"cascade": cascade_worker, "unet": unet_worker, "vae": vae_worker, "h200": h200_worker}


def run_worker(kind, params, fresh_process, timeout=None):
    """WORKERS[kind](**params), here or in a fresh process (malloc returning freed blocks above 64 KiB)."""
    if not fresh_process:
        return WORKERS[kind](**params)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), kind, json.dumps(params)], cwd=HERE,
                               env=env, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _benchmarked(benchmark, kind, params, fresh_process, timeout=None):
    """The mmfast variant's worker under the benchmark fixture (one round; it repeats the call itself)."""
    result = {}
    benchmark.pedantic(lambda: result.update(run_worker(kind, params, fresh_process, timeout)), rounds=1,
                       iterations=1)
    return result


# --- a. the tiny cascade -------------------------------------------------------------------


def test_tiny_cascade(benchmark):
    params = dict(height=TINY_HEIGHT, width=TINY_WIDTH, strengths=TINY_STRENGTHS, steps=TINY_STEPS,
                  options=TINY_OPTIONS, rounds=TINY_ROUNDS)
    benchmark.group = "linfusion-highres-tiny-cascade"
    result = _benchmarked(benchmark, "cascade", params, fresh_process=True, timeout=900)
    stages = result["stages"]
    final = stages[-1]
    record_metrics(benchmark, op="linfusion.highres.cascade[tiny]", device=DEVICE, dtype=torch.float32,
                   shape=f"tiny SD pipeline {' -> '.join(s['size'] for s in stages)} px, strengths "
                         f"{'/'.join(map(str, TINY_STRENGTHS))} of {TINY_STEPS} steps",
                   times={"mmfast": result["ms"]}, stages=stages, memory_options=TINY_OPTIONS,
                   max_peak_mb=max(s["peak_mb"] or 0 for s in stages),
                   final_stage_predicted_over_measured=final["predicted_over_measured_stage"],
                   predict_seconds=result["predict_seconds"], statistic=f"median of {TINY_ROUNDS} after a warm-up",
                   memory_note="CPU: peak = whole-process peak RSS; compare the stage columns (growth above the "
                               "stage's start)" if not ON_GPU else "CUDA max_memory_allocated")
    assert [s["denoising_steps"] for s in stages] == [TINY_STEPS] + [int(TINY_STEPS * s) for s in TINY_STRENGTHS]


# --- b. one SD-1.5 UNet step: LinFusion vs SDPA --------------------------------------------


@pytest.mark.parametrize("pixels", UNET_PIXELS)
def test_unet_step(benchmark, pixels):
    if not ON_GPU and not HIGHRES:
        pytest.skip("SD-1.5 on the CPU: tens of seconds a step at 512 px, minutes at 2048: set MMFAST_BENCH_HIGHRES=1")
    params = dict(pixels=pixels, rounds=UNET_ROUNDS)
    fresh = not ON_GPU  # CPU: faithful peak RSS; CUDA: max_memory_allocated in this process
    sdpa = run_worker("unet", dict(impl="sdpa", **params), fresh)
    benchmark.group = f"linfusion-highres-unet-step-{pixels}px"
    ours = _benchmarked(benchmark, "unet", dict(impl="linfusion", **params), fresh)
    latent = pixels // 8
    target = target_met = None  # issue 12 states these for an H200 alone: other devices report the ratio
    if GRADED and pixels <= 1024:
        target, target_met = "LinFusion UNet step no slower than SDPA at 512-1024 px", ours["ms"] <= sdpa["ms"]
    elif GRADED:
        target, target_met = "LinFusion UNet step >= 2x faster than SDPA at 2048 px and above", \
            2 * ours["ms"] <= sdpa["ms"]
    record_metrics(benchmark, op="linfusion.unet_step[sd15]", device=DEVICE, dtype=DTYPE,
                   shape=f"SD-1.5 UNet {pixels}px (latents {latent}x{latent}, {latent * latent} tokens at level 0) B=2",
                   times={"mmfast": ours["ms"], "sdpa": sdpa["ms"]}, target=target, target_met=target_met,
                   backend=BACKEND, peak_mb=_mb(ours["peak_bytes"]), sdpa_peak_mb=_mb(sdpa["peak_bytes"]),
                   peak_ratio_sdpa_over_linfusion=round(sdpa["peak_bytes"] / ours["peak_bytes"], 2)
                   if ours["peak_bytes"] else None,
                   resident_before_mb=_mb(ours["start_bytes"]), finite=ours["finite"] and sdpa["finite"],
                   statistic=f"median of {UNET_ROUNDS} after a warm-up (the peak-measured call)",
                   memory_note="peak above what was in use before the call (weights, inputs): "
                               + ("CUDA max_memory_allocated" if ON_GPU else "CPU peak RSS, fresh process per variant"))


# --- c. the VAE decode: untiled vs blend vs exact -------------------------------------------


@pytest.mark.parametrize("pixels, gated", VAE_CASES, ids=[f"{p}px" for p, _ in VAE_CASES])
def test_vae_decode(benchmark, pixels, gated):
    if gated and not HIGHRES:
        pytest.skip(f"SD-1.5's VAE decode at {pixels} px on the CPU takes minutes per mode: set MMFAST_BENCH_HIGHRES=1")
    latent = pixels // 8
    tile = min(64, latent // 2)  # diffusers' default 64 latent px (512 px); at least 2 tiles per side
    benchmark.group = f"linfusion-highres-vae-decode-{pixels}px"
    rounds = VAE_ROUNDS
    result = _benchmarked(benchmark, "vae", dict(pixels=pixels, tile=tile, rounds=rounds), fresh_process=not ON_GPU)
    none, blend, exact = result["none"], result["blend"], result["exact"]
    rounding = lambda error: {k: round(v, 6) if v != float("inf") else "inf" for k, v in error.items()}  # noqa: E731
    offload = {}
    if "exact_offload" in result:
        offload = {"exact_offload_ms": round(result["exact_offload"]["ms"], 2),
                   "exact_offload_peak_mb": _mb(result["exact_offload"]["peak_bytes"]),
                   "exact_offload_error_vs_untiled": rounding(result["exact_offload"]["error"])}
    record_metrics(benchmark, op="vae_tiling.decode[sd15 exact]", device=DEVICE, dtype=DTYPE,
                   shape=f"SD-1.5 VAE decode {pixels}px (latents {latent}x{latent}), tile {tile} latent px",
                   times={"mmfast": exact["ms"], "untiled": none["ms"], "blend": blend["ms"]},
                   peak_mb=_mb(exact["peak_bytes"]), untiled_peak_mb=_mb(none["peak_bytes"]),
                   blend_peak_mb=_mb(blend["peak_bytes"]), exact_error_vs_untiled=rounding(exact["error"]),
                   blend_error_vs_untiled=rounding(blend["error"]), **offload,
                   statistic=f"median of {rounds - 1} after the peak-measured call" if rounds > 1 else "one call",
                   memory_note="peak above what was in use before the call: "
                               + ("CUDA max_memory_allocated" if ON_GPU else "CPU peak RSS, fresh process"))
    if DTYPE == torch.float32:  # equal to untiled up to rounding (bf16 rounding differs by op order: recorded only)
        assert exact["error"]["max_abs"] < 1e-3, exact["error"]


# --- d. the H200 target: 16384 x 8192 in <= 60 s and < 80 GB -------------------------------


@pytest.mark.skipif(not ON_GPU, reason="the 16K cascade needs a GPU")
@pytest.mark.skipif(not HIGHRES, reason="set MMFAST_BENCH_HIGHRES=1 (the 16K cascade: minutes, planning included)")
def test_h200_16k_target(benchmark):
    predict = os.environ.get("MMFAST_BENCH_HIGHRES_PREDICT") == "1"  # minutes more: the planner's traces again
    params = dict(height=TARGET_HEIGHT, width=TARGET_WIDTH, steps=TARGET_STEPS, budget_bytes=PLAN_BUDGET,
                  predict=predict)
    benchmark.group = "linfusion-highres-16k"
    result = _benchmarked(benchmark, "h200", params, fresh_process=True)
    peak = max(result["process_peak_bytes"], result["max_stage_peak_bytes"])
    # the user's wait includes the plan (memory budget given): graded on plan + run; the H200's targets
    seconds_met = result["seconds"] + result["plan_seconds"] <= TARGET_SECONDS if GRADED else None
    memory_met = peak < TARGET_BUDGET if GRADED else None
    record_metrics(benchmark, op="linfusion.highres.cascade[sd15 16K]", device=DEVICE, dtype=torch.bfloat16,
                   shape=f"SD-1.5 {TARGET_WIDTH // 16}x{TARGET_HEIGHT // 16} -> {TARGET_WIDTH}x{TARGET_HEIGHT}, "
                         f"strengths 0.4/0.3/0.2/0.1 of {TARGET_STEPS} steps, planned for 72 GB",
                   times={"mmfast": result["seconds"] * 1e3}, backend=BACKEND,
                   total_seconds=round(result["seconds"], 2), stage_seconds=round(result["stage_seconds"], 2),
                   plan_seconds=result["plan_seconds"],
                   outside_stages_seconds=round(result["seconds"] - result["stage_seconds"], 2),
                   max_peak_gib=round(peak / 2**30, 2), max_peak_gb=round(peak / 1e9, 2),
                   max_stage_peak_gib=round(result["max_stage_peak_bytes"] / 2**30, 2), stages=result["stages"],
                   seconds_with_plan=round(result["seconds"] + result["plan_seconds"], 2),
                   seconds_target_met=seconds_met, memory_target_met=memory_met,
                   stage_seconds_within_target=result["stage_seconds"] <= TARGET_SECONDS,
                   predict_seconds=result["predict_seconds"],
                   target="16384x8192 in <= 60 s (planning included) and < 80 GB peak (reserved)",
                   target_met=None if seconds_met is None else seconds_met and memory_met)


if __name__ == "__main__":  # a worker in a fresh process: python bench_linfusion_highres.py KIND JSON
    print(json.dumps(WORKERS[sys.argv[1]](**json.loads(sys.argv[2]))))
