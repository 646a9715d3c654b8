"""LinFusion attn1 latency: mmfast module vs the official-style PyTorch module vs diffusers SDPA.

CPU shapes are SD-1.5 level 0 (C = 320, 8 heads x 40) at reduced token counts, batch 1.
extra_info of each mmfast run holds the milliseconds of every variant and the speedups.

The 16K case (one level-0 layer at N = 2,097,152 tokens, bf16, time and peak memory)
runs only with MMFAST_BENCH_HIGHRES=1: it takes about a minute and ~3 GB of RAM.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import nn

import mmfast
from mmfast.models.linfusion import GeneralizedLinearAttention
from mmfast.models.linfusion.official import OfficialLinearAttention, official_linear_attention

from _utils import bench_device, grade_row, graph_or_eager_ms, median_ms as device_median_ms, record_metrics, run_timed

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention  # noqa: E402

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# Without the native kernel on DEVICE the "mmfast" rows time the PyTorch reference: reported
# (their `backend` column says so), never graded.
BACKEND = "native" if mmfast._backend.native_available("linear_attention", DEVICE) else "reference"
ROUNDS = 5


@dataclass(frozen=True)
class Layer:
    """One attn1 layer shape: channels C = heads x head dim."""

    name: str
    channels: int
    heads: int
    mid_dim_scale: Optional[int] = None  # SD-XL's q/k MLPs have M = C / 16


LAYERS = [Layer("sd15-L0", 320, 8), Layer("sd21-L0", 320, 5), Layer("sdxl-L1", 640, 10, 16)]
if ON_GPU:  # 1024, 2048 and 4096 px
    TOKENS = {"sd15-L0": (16384, 65536, 262144), "sd21-L0": (16384, 65536, 262144), "sdxl-L1": (4096, 16384, 65536)}
    SDPA_MAX_TOKENS = 262144
else:  # scaled down: 2 CPU cores
    TOKENS = {"sd15-L0": (1024, 4096, 16384), "sd21-L0": (4096,), "sdxl-L1": (1024, 4096)}
    SDPA_MAX_TOKENS = 4096  # quadratic: N = 16384 is ~10 s per call on 2 cores
CASES = [pytest.param(layer, n, id=f"{layer.name}-N{n}") for layer in LAYERS for n in TOKENS[layer.name]]
CHANNELS, HEADS = 320, 8  # the 16K case below: SD-1.5 level 0, D = 40

_measured_ms: dict = {}


@functools.lru_cache(maxsize=None)
def modules_for(layer: Layer) -> dict:
    torch.manual_seed(0)
    mid = None if layer.mid_dim_scale is None else layer.channels // layer.mid_dim_scale
    ours = GeneralizedLinearAttention(layer.channels, layer.heads, mid).eval().to(DEVICE, DTYPE)
    sdpa = Attention(query_dim=layer.channels, heads=layer.heads, dim_head=layer.channels // layer.heads, bias=False,
                     out_bias=True).eval().to(DEVICE, DTYPE)
    return {"mmfast": ours, "official": OfficialLinearAttention.from_module(ours), "sdpa": sdpa}


def module_floor_bytes(module: nn.Module, tokens: int) -> int:
    """The module's bandwidth floor: every Linear and LayerNorm reads its input and writes
    its output once (weights included), and the attention core reads q, k, v and writes out."""
    elem = torch.tensor([], dtype=DTYPE).element_size()
    total = 4 * tokens * module.dim_n * elem
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            total += tokens * (layer.in_features + layer.out_features) * elem + layer.weight.numel() * elem
        elif isinstance(layer, nn.LayerNorm):
            total += 2 * tokens * layer.normalized_shape[0] * elem
    return total


def median_ms(fn, rounds=ROUNDS):
    """Median of `rounds` after a warm-up, synchronised (CUDA events on a GPU)."""
    return device_median_ms(fn, DEVICE, warmup=1, repeats=rounds)


def _module_call(impl, x, layer):
    module = modules_for(layer)[impl]

    def run():
        with torch.inference_mode(), mmfast.use_backend(BACKEND):
            module(x)
    return run


def _core_call(impl, qkv, layer):
    """The attention core alone on (B, N, H, D) views of one fused (1, N, 3C) qkv buffer (views
    only: the timed call launches no copy)."""
    c, h = layer.channels, layer.heads
    q, k, v = (t.view(1, qkv.shape[1], h, c // h) for t in qkv.split(c, -1))
    core = {
        "mmfast": lambda: mmfast.linear_attention(q, k, v, backend=BACKEND),
        "official": lambda: official_linear_attention(q, k, v),
    }[impl]

    def run():
        with torch.inference_mode():
            core()
    return run


CALLS = {"module": _module_call, "core": _core_call}
INPUTS = {"module": lambda x: x, "core": lambda x: x.repeat(1, 1, 3)}  # the call's input from (1, N, C) x


_timings: dict = {}  # (scope, impl, layer, tokens) -> how the GPU time was taken


def _device_ms(scope, impl, layer, x):
    """A call's time: on a GPU its device time under CUDA-graph replay over rotating inputs
    (graph_or_eager_ms: no host launch overhead, which eager CUDA events include and which the
    module's dozen small kernels make visible next to a 60%-of-HBM target), else median_ms."""
    x = INPUTS[scope](x)
    if not ON_GPU:
        return median_ms(CALLS[scope](impl, x, layer))
    timings = {}
    ms = graph_or_eager_ms(lambda t: CALLS[scope](impl, t, layer)(), lambda: (torch.randn_like(x),), DEVICE,
                           timings, impl)
    _timings[(scope, impl, layer.name, x.shape[1])] = timings[impl]
    return ms


def _baseline_ms(scope, impl, layer, tokens, x):
    key = (scope, impl, layer.name, tokens)
    if key not in _measured_ms:
        _measured_ms[key] = _device_ms(scope, impl, layer, x)
    return _measured_ms[key]


def _run_and_record(benchmark, scope, impl, layer, tokens, baselines):
    x = torch.randn(1, tokens, layer.channels, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"linfusion-attn1-{scope}-{layer.name}-N{tokens}"
    ms = run_timed(benchmark, CALLS[scope](impl, INPUTS[scope](x), layer), DEVICE, rounds=ROUNDS, warmup=1)
    if ON_GPU:  # device time; the fixture's wall time includes launch overhead
        ms = _device_ms(scope, impl, layer, x)
    _measured_ms[(scope, impl, layer.name, tokens)] = ms
    dtype = str(DTYPE).replace("torch.", "")
    benchmark.extra_info.update({"scope": scope, "impl": impl, "backend": BACKEND, "tokens": tokens, "layer": layer.name,
                                 "ms": round(ms, 3), "channels": layer.channels, "heads": layer.heads, "batch": 1,
                                 "dtype": dtype, "statistic": f"median of {ROUNDS}"})
    if impl != "mmfast":
        return
    times = {"mmfast": ms}
    times.update({baseline: _baseline_ms(scope, baseline, layer, tokens, x) for baseline in baselines})
    floor = module_floor_bytes(modules_for(layer)["mmfast"], tokens) if scope == "module" else None
    info = record_metrics(benchmark, op=f"linfusion.attn1.{scope}", device=DEVICE, dtype=DTYPE, times=times,
                          shape=f"{layer.name} C={layer.channels} H={layer.heads} B=1 N={tokens}", floor_bytes=floor)
    if ON_GPU:
        benchmark.extra_info["timing"] = {name: _timings.get((scope, name, layer.name, tokens)) for name in times}
    if scope == "module" and ON_GPU and BACKEND == "native":
        grade_row(benchmark, ">= 60% of the module's HBM floor", info.get("pct_of_floor", 0) >= 60)


@pytest.mark.parametrize("layer, tokens", CASES)
@pytest.mark.parametrize("impl", ["sdpa", "official", "mmfast"])
def test_attn1_module_latency(benchmark, impl, layer, tokens):
    """The whole attn1 module: projections, q/k MLPs, attention, output projection."""
    if impl == "sdpa" and tokens > SDPA_MAX_TOKENS:
        pytest.skip(f"softmax attention at N={tokens} is quadratic: too slow here")
    baselines = ["official"] + (["sdpa"] if tokens <= SDPA_MAX_TOKENS else [])
    _run_and_record(benchmark, "module", impl, layer, tokens, baselines)


@pytest.mark.parametrize("layer, tokens", CASES)
@pytest.mark.parametrize("impl", ["official", "mmfast"])
def test_attn1_core_latency(benchmark, impl, layer, tokens):
    """The linear-attention core alone (what mmfast replaces; the GEMMs around it are the same)."""
    _run_and_record(benchmark, "core", impl, layer, tokens, ["official"])


# --- one UNet step: an SD-1.5-width UNet (320/640 channels, 8 heads: D = 40/80) at 256 px ----------

UNET_LATENT = 32  # 256 px: 1024 tokens at level 0 (512 px is ~5 s a step on 2 cores)
UNET_ROUNDS = 2


@pytest.fixture(scope="module")
def sd15_width_unet():
    from mmfast.testing.tiny_diffusers import tiny_unet

    return tiny_unet((320, 640), heads=8, cross_attention_dim=768, norm_num_groups=32, sample_size=UNET_LATENT)


@pytest.mark.parametrize("impl", ["sdpa", "linfusion"])
def test_unet_step_latency(benchmark, sd15_width_unet, impl):
    from mmfast.models.linfusion import LinFusion

    unet = sd15_width_unet.to(DEVICE, DTYPE)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, UNET_LATENT, UNET_LATENT, generator=generator).to(DEVICE, DTYPE)
    text = torch.randn(1, 77, 768, generator=generator).to(DEVICE, DTYPE)
    timestep = torch.tensor([500], device=DEVICE)

    def run():
        with torch.inference_mode(), mmfast.use_backend(BACKEND):
            unet(latents, timestep, text)

    if impl == "linfusion" and ("unet", "sdpa") not in _measured_ms:  # run alone (-k): its baseline here
        _measured_ms[("unet", "sdpa")] = median_ms(run, rounds=UNET_ROUNDS)
    linfusion = LinFusion.construct_for(unet, load_pretrained=False) if impl == "linfusion" else None
    try:
        benchmark.group = f"linfusion-unet-step-{UNET_LATENT * 8}px"
        ms = run_timed(benchmark, run, DEVICE, rounds=UNET_ROUNDS, warmup=1)
    finally:
        if linfusion is not None:
            linfusion.unmount()
    _measured_ms[("unet", impl)] = ms
    benchmark.extra_info.update({"impl": impl, "backend": BACKEND, "ms": round(ms, 1), "pixels": UNET_LATENT * 8,
                                 "block_out_channels": [320, 640], "heads": 8, "dtype": str(DTYPE).replace("torch.", ""),
                                 "statistic": f"median of {UNET_ROUNDS}"})
    if impl == "linfusion":
        record_metrics(benchmark, op="linfusion.unet_step", shape=f"sd15-width UNet (320, 640) {UNET_LATENT * 8}px B=1",
                       device=DEVICE, dtype=DTYPE, times={"mmfast": ms, "sdpa": _measured_ms[("unet", "sdpa")]})


# --- the 16K case: one level-0 layer at 16384 x 8192 px (N = 2048 * 1024 latent tokens) ---------

HIGHRES_TOKENS = 2048 * 1024
HIGHRES_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch, mmfast
    from mmfast.models.linfusion import GeneralizedLinearAttention
    tokens, channels, heads, chunk, backend = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                               int(sys.argv[4]), sys.argv[5])
    torch.manual_seed(0)
    module = GeneralizedLinearAttention(channels, heads).to(torch.bfloat16).eval()
    module.token_chunk_size = chunk or None
    x = torch.empty(1, tokens, channels, dtype=torch.bfloat16)
    for start in range(0, tokens, 1 << 16):   # filled in place: no fp32 temporary
        x[:, start:start + (1 << 16)].normal_()

    from mmfast.memory import PeakMemory

    start = time.perf_counter()
    with PeakMemory("cpu") as meter, torch.inference_mode(), mmfast.use_backend(backend):
        out = module(x)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_before_kb": meter.start_bytes // 1024,
                      "peak_rss_kb": (meter.start_bytes + meter.peak_bytes) // 1024,
                      "finite": bool(torch.isfinite(out[:, :: 4096]).all())}))
""")


@pytest.mark.skipif(os.environ.get("MMFAST_BENCH_HIGHRES") != "1", reason="set MMFAST_BENCH_HIGHRES=1 (slow)")
def test_attn1_16k_bf16_peak_memory(benchmark):
    """Peak RSS growth over the resident input, weights and interpreter, in a fresh process."""
    chunk = int(os.environ.get("MMFAST_BENCH_HIGHRES_CHUNK", 1 << 16))
    args = [sys.executable, "-c", HIGHRES_SCRIPT, str(HIGHRES_TOKENS), str(CHANNELS), str(HEADS), str(chunk), BACKEND]
    result = {}

    def run():
        completed = subprocess.run(args, check=True, capture_output=True, text=True)
        result.update(json.loads(completed.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    tensor_bytes = HIGHRES_TOKENS * CHANNELS * 2  # one (1, N, C) bf16 tensor
    growth = (result["peak_rss_kb"] - result["rss_before_kb"]) * 1024
    benchmark.extra_info.update({
        "tokens": HIGHRES_TOKENS, "backend": BACKEND, "token_chunk_size": chunk, "seconds": round(result["seconds"], 2),
        "input_plus_output_gb": round(2 * tensor_bytes / 1e9, 3), "peak_growth_gb": round(growth / 1e9, 3),
        "peak_growth_over_output": round(growth / tensor_bytes, 2),
        "softmax_attention_scores_tb": round(HEADS * HIGHRES_TOKENS**2 * 2 / 1e12, 1),
    })
    # The output (1x the input size) is new memory; everything else must be small beside it.
    record_metrics(benchmark, op="linfusion.attn1[16k, peak memory]",
                   shape=f"SD-1.5 level 0 C={CHANNELS} H={HEADS} N={HIGHRES_TOKENS} (16384x8192 px)",
                   device=torch.device("cpu"), dtype=torch.bfloat16, times={"mmfast": 1e3 * result["seconds"]},
                   target="peak RSS growth < 3x one (1, N, C) bf16 tensor", target_met=growth < 3 * tensor_bytes)
    assert result["finite"]
    assert growth < 3 * tensor_bytes, benchmark.extra_info
