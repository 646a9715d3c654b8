"""Liquid's / Chameleon's VQGAN tokenizer end to end: encode (images -> codes) and decode
(codes -> images) throughput in images/s, Chameleon's architecture with random weights.

Baselines measured in the same run: taming's own quantisation step (the N x K distance
matrix ||z||^2 + ||e||^2 - 2 z.e, argmin, then `embedding(indices)` and a permute copy) in
place of mmfast's vq_quantize / vq_dequantize, with the same encoder and decoder. The
convolutions dominate both; the rows show what the tokenizer costs and what the VQ ops save
of it. GPU: 512 px, batch 8, bf16. CPU (2 cores): 128 px, batch 2, fp32.
"""
from __future__ import annotations

import pytest
import torch

from mmfast.models.liquid import VQGAN, VQGANConfig

from _utils import bench_device, median_ms, record_metrics, run_timed

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
RESOLUTION, BATCH, DTYPE = (512, 8, torch.bfloat16) if ON_GPU else (128, 2, torch.float32)


@pytest.fixture(scope="module")
def vqgan():
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = VQGAN(VQGANConfig())
    return model.to(DTYPE).eval()


def _images():
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(BATCH, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1).to(DEVICE, DTYPE)


@torch.no_grad()
def _taming_codes(model, images):
    """taming's VectorQuantizer2.forward index computation, on the same latent."""
    z = model.encode_to_latent(images).permute(0, 2, 3, 1).reshape(-1, model.config.embed_dim)
    weight = model.quantize.embedding.weight
    d = z.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * z @ weight.T
    side = RESOLUTION // model.config.downsample_factor
    return d.argmin(dim=1).reshape(images.shape[0], side, side)


@torch.no_grad()
def _taming_decode(model, codes):
    z_q = model.quantize.embedding(codes).permute(0, 3, 1, 2).contiguous()
    return model.decode_latent(z_q).clamp_(-1.0, 1.0)


def _record(benchmark, op, times, model):
    record_metrics(benchmark, op=op, shape=f"chameleon {RESOLUTION}px batch {BATCH}", device=DEVICE, dtype=DTYPE,
                   times=times, items=(BATCH, "images"),
                   codes_per_image=(RESOLUTION // model.config.downsample_factor) ** 2)


def test_vqgan_encode(benchmark, vqgan):
    images = _images()
    run = lambda: vqgan.encode(images, progress=False)  # noqa: E731
    times = {"mmfast": run_timed(benchmark, run, DEVICE, rounds=3, warmup=1)}
    if ON_GPU:
        times["mmfast"] = median_ms(run, DEVICE, warmup=1, repeats=5)
    times["taming"] = median_ms(lambda: _taming_codes(vqgan, images), DEVICE, warmup=1, repeats=3)
    _record(benchmark, "VQGAN.encode", times, vqgan)


def test_vqgan_decode(benchmark, vqgan):
    side = RESOLUTION // vqgan.config.downsample_factor
    codes = torch.randint(0, vqgan.config.n_embed, (BATCH, side, side), generator=torch.Generator().manual_seed(1))
    codes = codes.to(DEVICE)
    run = lambda: vqgan.decode(codes, progress=False)  # noqa: E731
    times = {"mmfast": run_timed(benchmark, run, DEVICE, rounds=3, warmup=1)}
    if ON_GPU:
        times["mmfast"] = median_ms(run, DEVICE, warmup=1, repeats=5)
    times["taming"] = median_ms(lambda: _taming_decode(vqgan, codes), DEVICE, warmup=1, repeats=3)
    _record(benchmark, "VQGAN.decode", times, vqgan)
