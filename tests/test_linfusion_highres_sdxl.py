"""LinFusion's high-resolution SDEdit cascade (models/linfusion/highres.py) and its memory model
(highres_memory.py) on a tiny random SD-XL pipeline (testing/tiny_diffusers.py: tiny_sdxl_pipeline):
two text encoders, the "text_time" added conditioning, the SD-XL img2img pipeline for the
upscaling stages, and the fp16 VAE that SD-XL decodes in fp32 (force_upcast)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from mmfast.models import vae_tiling  # noqa: E402
from mmfast.models.linfusion import (  # noqa: E402
    LinFusion, MemoryOptions, estimate_highres_memory, generate_highres,
)
from mmfast.models.linfusion import highres  # noqa: E402
from mmfast.models.linfusion.attention import GeneralizedLinearAttention  # noqa: E402
from mmfast.models.linfusion.highres_memory import estimate_stage_memory  # noqa: E402
from mmfast.testing.tiny_diffusers import tiny_sdxl_pipeline, tiny_sdxl_unet  # noqa: E402

# The tiny VAE downsamples 2x and the UNet once more: stage sizes must be multiples of 4 px,
# and diffusers' SD-XL text-to-image call wants multiples of 8 (the base stage: 16 x 32).
HEIGHT, WIDTH = 64, 128
STRENGTHS = (0.5, 0.5)
STEPS = 4
PROMPT = "a red fox in the snow"
MID_DIM_SCALE = 16  # SD-XL LinFusion's MLP width C // 16 (the tiny UNet's attn1 have C = 64)


def _generate(pipe, **kwargs):
    kwargs.setdefault("strengths", STRENGTHS)
    kwargs.setdefault("height", HEIGHT)
    kwargs.setdefault("width", WIDTH)
    return generate_highres(pipe, PROMPT, steps=STEPS, generator=torch.Generator().manual_seed(0),
                            progress=False, **kwargs)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _added_conditions(rows: int, height: int, width: int) -> dict:
    return {"text_embeds": torch.randn(rows, 24),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * rows, dtype=torch.float32)}


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sdxl_pipeline(seed=0)
    LinFusion.construct_for(pipe, mid_dim_scale=MID_DIM_SCALE, load_pretrained=False)
    return pipe


@pytest.fixture(scope="module")
def plain(pipe):
    """The cascade without memory options, with every img2img call and UNet call recorded."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    img2img_calls, unet_calls = [], []
    original = StableDiffusionXLImg2ImgPipeline.__call__

    def spy(self, *args, **kwargs):
        img2img_calls.append((type(self), self.unet is pipe.unet, kwargs["strength"], tuple(kwargs["image"].shape)))
        return original(self, *args, **kwargs)

    def record_unet_call(module, args, kwargs):
        time_ids = kwargs["added_cond_kwargs"]["time_ids"]
        unet_calls.append((tuple(args[0].shape[-2:]), tuple(int(v) for v in time_ids[0].tolist())))

    hook = pipe.unet.register_forward_pre_hook(record_unet_call, with_kwargs=True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(StableDiffusionXLImg2ImgPipeline, "__call__", spy)
            out = _generate(pipe, return_stages=True)
    finally:
        hook.remove()
    return out, img2img_calls, unet_calls


# --- LinFusion on the SD-XL UNet -----------------------------------------------------------


def test_linfusion_replaces_every_attn1_of_the_sdxl_unet(pipe):
    attn1 = {name: m for name, m in pipe.unet.named_modules() if name.endswith("attn1")}
    # Level 1's transformers have 2 layers (transformer_layers_per_block=(1, 2)), as has the
    # mid block's: (1 down + 2 up + 1 mid attention) x 2 layers.
    assert len(attn1) == 8
    assert all(isinstance(m, GeneralizedLinearAttention) for m in attn1.values())
    assert {(m.dim_n, m.heads, m.projection_mid_dim) for m in attn1.values()} == {(64, 4, 64 // MID_DIM_SCALE)}
    attn2 = [m for name, m in pipe.unet.named_modules() if name.endswith("attn2")]
    assert len(attn2) == 8 and not any(isinstance(m, GeneralizedLinearAttention) for m in attn2)
    assert {m.to_k.in_features for m in attn2} == {32 + 48}  # both text encoders' hidden states


def test_linfusion_default_mlp_mounts_and_unmounts_on_the_sdxl_unet():
    unet = tiny_sdxl_unet(seed=1)
    originals = {name: m for name, m in unet.named_modules() if name.endswith("attn1")}
    sample, text = torch.randn(2, 4, 8, 12), torch.randn(2, 77, 80)
    linfusion = LinFusion.construct_for(unet, load_pretrained=False)
    assert all(spec.projection_mid_dim is None for spec in linfusion.specs)
    with torch.no_grad():
        out = unet(sample, 10, text, added_cond_kwargs=_added_conditions(2, 16, 24)).sample
    assert out.shape == sample.shape and torch.isfinite(out).all()
    linfusion.unmount()
    assert all(unet.get_submodule(name) is module for name, module in originals.items())


# --- the cascade -----------------------------------------------------------------------------


def test_sdxl_cascade_stage_sizes_and_image(plain):
    out, _, _ = plain
    assert out.image.size == (WIDTH, HEIGHT)
    assert [(s.height, s.width) for s in out.stages] == [(16, 32), (32, 64), (64, 128)]
    assert [s.image.size for s in out.stages] == [(32, 16), (64, 32), (128, 64)]
    assert [s.strength for s in out.stages] == [None, 0.5, 0.5]
    assert [s.denoising_steps for s in out.stages] == [STEPS, 2, 2]
    pixels = _pixels(out.image)
    assert np.isfinite(pixels).all() and pixels.std() > 1  # not a constant image
    np.testing.assert_array_equal(_pixels(out.stages[-1].image), pixels)


def test_sdxl_cascade_upscales_with_the_sdxl_img2img_pipeline(plain):
    """Each upscaling stage is a StableDiffusionXLImg2ImgPipeline call on the same UNet, on the
    encoded 2x image's latents, and the UNet gets SD-XL's size conditioning of that stage."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    _, img2img_calls, unet_calls = plain
    assert img2img_calls == [(StableDiffusionXLImg2ImgPipeline, True, 0.5, (1, 4, 16, 32)),
                             (StableDiffusionXLImg2ImgPipeline, True, 0.5, (1, 4, 32, 64))]
    # time_ids = (original h, w, crop top, left, target h, w): the stage's own size.
    assert unet_calls == ([((8, 16), (16, 32, 0, 0, 16, 32))] * STEPS + [((16, 32), (32, 64, 0, 0, 32, 64))] * 2
                          + [((32, 64), (64, 128, 0, 0, 64, 128))] * 2)


def test_sdxl_base_stage_matches_the_diffusers_pipeline(pipe):
    """Without upscaling stages the cascade is the SD-XL text-to-image call, decoded as diffusers does."""
    ours = _generate(pipe, strengths=(), height=16, width=32)
    theirs = pipe(PROMPT, height=16, width=32, num_inference_steps=STEPS, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(_pixels(ours) - _pixels(theirs)).max() <= 1


def test_sdxl_unet_memory_options_are_exact(pipe):
    """CFG rows one at a time (text_embeds and time_ids split with them) and token-chunked attn1 /
    feed-forward give the SD-XL UNet's output up to float rounding."""
    sample, text = torch.randn(2, 4, 12, 20), torch.randn(2, 77, 80)
    added = _added_conditions(2, 24, 40)
    added["time_ids"][1, 0] = 48  # the rows differ: a wrong split would show
    with torch.no_grad():
        expected = pipe.unet(sample, 10, text, added_cond_kwargs=added).sample
        options = MemoryOptions(cfg_batch_size=1, token_chunk_size=37, ff_chunk_size=53)
        with highres.memory_options_applied(pipe.unet, options) as unet:
            chunked = unet(sample, 10, text, added_cond_kwargs=added).sample
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    assert "forward" not in pipe.unet.__dict__


def test_sdxl_cascade_with_unet_memory_options_matches_plain(pipe, plain):
    """Not bit-equal: one CFG row per call changes the GEMMs' batch shapes and token chunks the
    order in which attn1 sums k^T v, so the UNet output differs in the last float bits
    (~1e-6, test above); over the denoising steps that can flip an 8-bit rounding."""
    options = MemoryOptions(cfg_batch_size=1, token_chunk_size=37, ff_chunk_size=53, vae_tiling="none")
    chunked = _generate(pipe, memory=options, return_stages=True)
    assert all(stage.options == options for stage in chunked.stages)
    assert np.abs(_pixels(chunked.image) - _pixels(plain[0].image)).max() <= 1


# --- the fp16 VAE (force_upcast) ----------------------------------------------------------------


def _fp16_vae_pipeline(pipe):
    """pipe's modules (LinFusion-mounted fp32 UNet, text encoders) with a float16 copy of its VAE."""
    from diffusers import StableDiffusionXLPipeline

    vae = copy.deepcopy(pipe.vae).to(torch.float16)
    try:
        with torch.no_grad():
            vae.decode(torch.zeros(1, 4, 4, 4, dtype=torch.float16))
    except (RuntimeError, NotImplementedError) as error:  # an fp16 kernel missing on this CPU build
        pytest.skip(f"the float16 VAE does not run on this torch's CPU kernels: {error}")
    return StableDiffusionXLPipeline(**{**pipe.components, "vae": vae}, add_watermarker=False)


def test_sdxl_fp16_vae_decodes_in_fp32_and_stays_fp16(pipe, plain, monkeypatch):
    fp16 = _fp16_vae_pipeline(pipe)
    assert fp16.vae.config.force_upcast and highres.vae_needs_upcast(fp16)
    passes = []
    original_decode, original_encode = vae_tiling.decode_latents, vae_tiling.encode_images

    def decode(vae, latents, **kwargs):
        images = original_decode(vae, latents, **kwargs)
        passes.append(("decode", vae.dtype, latents.dtype, images.dtype))
        return images

    def encode(vae, images, **kwargs):
        latents = original_encode(vae, images, **kwargs)
        passes.append(("encode", vae.dtype, images.dtype, latents.dtype))
        return latents

    monkeypatch.setattr(vae_tiling, "decode_latents", decode)
    monkeypatch.setattr(vae_tiling, "encode_images", encode)
    out = _generate(fp16)
    assert [p[0] for p in passes] == ["decode", "encode", "decode", "encode", "decode"]
    assert all(p[1:] == (torch.float32,) * 3 for p in passes), passes
    assert fp16.vae.dtype == torch.float16 and all(p.dtype == torch.float16 for p in fp16.vae.parameters())
    # The fp32 passes with fp16-rounded weights: close to the fp32 VAE's image.
    difference = np.abs(_pixels(out) - _pixels(plain[0].image))
    assert difference.max() <= 4 and _pixels(out).std() > 1


def test_sdxl_family_pipelines_upcast_too(pipe):
    """Not only the two SD-XL classes read force_upcast in diffusers: PAG-XL (and Kolors) do, and
    define upcast_vae as those do; SD-1.5's pipelines define neither."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPAGPipeline

    fp16 = _fp16_vae_pipeline(pipe)
    pag = StableDiffusionXLPAGPipeline(**fp16.components)
    assert highres.vae_needs_upcast(pag)
    assert not hasattr(StableDiffusionPipeline, "upcast_vae")


def test_sdxl_fp16_vae_base_stage_has_no_encode_phase(pipe):
    memory = estimate_stage_memory(_fp16_vae_pipeline(pipe), index=0, height=16, width=32)
    assert memory.encode_bytes == 0


def test_sdxl_vae_latents_mean_and_std_are_applied(pipe):
    from diffusers import StableDiffusionXLPipeline

    vae = copy.deepcopy(pipe.vae)
    vae.register_to_config(latents_mean=[0.5, -0.5, 0.25, 0.0], latents_std=[2.0, 0.5, 1.0, 1.5])
    shifted = StableDiffusionXLPipeline(**{**pipe.components, "vae": vae}, add_watermarker=False)
    ours = _generate(shifted, strengths=(), height=16, width=32)
    theirs = shifted(PROMPT, height=16, width=32, num_inference_steps=STEPS, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(_pixels(ours) - _pixels(theirs)).max() <= 1


# --- the memory model ----------------------------------------------------------------------


def test_sdxl_memory_model_traces_the_text_time_unet(pipe):
    stages = estimate_highres_memory(pipe, height=HEIGHT, width=WIDTH, strengths=STRENGTHS)
    assert [(s.index, s.height, s.width) for s in stages] == [(0, 16, 32), (1, 32, 64), (2, 64, 128)]
    assert stages[0].denoise_bytes > 0
    assert all(a.denoise_bytes < b.denoise_bytes for a, b in zip(stages, stages[1:]))  # grows with the size
    assert stages[0].encode_bytes == 0 and stages[1].encode_bytes > 0
    assert stages[0].carried_bytes == 0 and stages[1].carried_bytes > 0
    weights = sum(p.numel() * p.element_size() for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                  for p in getattr(pipe, name).parameters())
    assert stages[0].weights_bytes >= weights  # both text encoders counted


def test_sdxl_memory_model_of_a_meta_pipeline_in_fp16_equals_the_loaded_one():
    """SD-XL in fp16 (the VAE upcast to fp32 for its passes) planned without loading weights:
    built under accelerate.init_empty_weights, predicted as the loaded pipeline."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        empty = tiny_sdxl_pipeline(seed=0)
    loaded = tiny_sdxl_pipeline(seed=0)
    for pipeline in (empty, loaded):
        LinFusion.construct_for(pipeline, mid_dim_scale=MID_DIM_SCALE, load_pretrained=False)
        pipeline.to(torch.float16)
    assert empty.vae.device.type == "meta" and highres.vae_needs_upcast(empty)
    kwargs = dict(height=HEIGHT, width=WIDTH, strengths=STRENGTHS)
    assert estimate_highres_memory(empty, **kwargs) == estimate_highres_memory(loaded, **kwargs)
