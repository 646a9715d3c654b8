"""LinFusion's high-resolution SDEdit cascade (models/linfusion/highres.py) and its memory
model (highres_memory.py) on tiny random SD-1.5-style pipelines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from mmfast.models.linfusion import (  # noqa: E402
    LinFusion, MemoryOptions, estimate_highres_memory, generate_highres, plan_memory_options,
)
from mmfast.models.linfusion import highres  # noqa: E402
from mmfast.models.linfusion.highres_memory import estimate_stage_memory  # noqa: E402
from mmfast.testing.tiny_diffusers import tiny_pipeline  # noqa: E402

from _utils import rendezvous  # noqa: E402

# The tiny pipeline's VAE downsamples 2x and its UNet once more: sizes are multiples of 4 px.
HEIGHT, WIDTH = 64, 128
STRENGTHS = (0.5, 0.5)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline(seed=0)
    LinFusion.construct_for(pipe, load_pretrained=False)
    return pipe


def _generate(pipe, **kwargs):
    kwargs.setdefault("strengths", STRENGTHS)
    return generate_highres(pipe, "a red fox in the snow", height=HEIGHT, width=WIDTH, steps=4,
                            generator=torch.Generator().manual_seed(0), progress=False, **kwargs)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_seed_reseeds_every_stage_as_the_official_notebook(pipe):
    """seed=3: every stage draws from a generator seeded with 3 (the notebook's torch.manual_seed(3)
    before each stage), which one generator run on through the stages does not reproduce."""
    out = generate_highres(pipe, "a red fox in the snow", height=HEIGHT, width=WIDTH, steps=4, strengths=STRENGTHS,
                           seed=3, progress=False, return_stages=True)
    continued = generate_highres(pipe, "a red fox in the snow", height=HEIGHT, width=WIDTH, steps=4,
                                 strengths=STRENGTHS, generator=torch.Generator().manual_seed(3), progress=False,
                                 return_stages=True)
    np.testing.assert_array_equal(_pixels(out.stages[0].image), _pixels(continued.stages[0].image))
    assert not np.array_equal(_pixels(out.image), _pixels(continued.image))
    again = generate_highres(pipe, "a red fox in the snow", height=HEIGHT, width=WIDTH, steps=4, strengths=STRENGTHS,
                             seed=3, progress=False)
    np.testing.assert_array_equal(_pixels(out.image), _pixels(again))
    with pytest.raises(ValueError, match="instead of generator"):
        generate_highres(pipe, "x", height=HEIGHT, width=WIDTH, seed=3, generator=torch.Generator())


def test_cascade_stage_sizes_and_steps(pipe):
    out = _generate(pipe, return_stages=True)
    assert out.image.size == (WIDTH, HEIGHT)
    assert [(s.height, s.width) for s in out.stages] == [(16, 32), (32, 64), (64, 128)]
    assert [s.image.size for s in out.stages] == [(32, 16), (64, 32), (128, 64)]
    assert [s.strength for s in out.stages] == [None, 0.5, 0.5]
    assert [s.denoising_steps for s in out.stages] == [4, 2, 2]
    assert all(s.seconds > 0 for s in out.stages)
    if sys.platform.startswith("linux"):
        assert all(s.peak_memory_bytes >= s.stage_memory_bytes >= 0 for s in out.stages)
    np.testing.assert_array_equal(_pixels(out.stages[-1].image), _pixels(out.image))
    assert _pixels(out.image).std() > 1  # not a constant image


def test_cascade_runs_img2img_stages(pipe, monkeypatch):
    """Each upscaling stage is an img2img call at the right strength on latents of twice the size."""
    from diffusers import StableDiffusionImg2ImgPipeline

    calls = []
    original = StableDiffusionImg2ImgPipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append((kwargs["strength"], tuple(kwargs["image"].shape)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionImg2ImgPipeline, "__call__", spy)
    _generate(pipe, strengths=(0.4, 0.3))
    assert calls == [(0.4, (1, 4, 16, 32)), (0.3, (1, 4, 32, 64))]


def test_unet_memory_options_are_exact(pipe, monkeypatch):
    """CFG one row at a time and token-chunked attn1 / attn2 / feed-forward give the same UNet
    output (and really run chunked: the spies count the calls)."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention

    from mmfast.models.linfusion import GeneralizedLinearAttention

    calls = {"unet_rows": [], "ff_tokens": [], "attn_chunked": 0, "attn2_tokens": []}
    ff_forward, unet_forward, attention_forward = FeedForward.forward, type(pipe.unet).forward, Attention.forward
    monkeypatch.setattr(Attention, "forward", lambda self, x, *a, **k: (
        self.is_cross_attention and calls["attn2_tokens"].append(x.shape[1]), attention_forward(self, x, *a, **k))[1])
    chunked_attention = GeneralizedLinearAttention._forward_chunked
    monkeypatch.setattr(FeedForward, "forward", lambda self, x, *a, **k: (
        calls["ff_tokens"].append(x.shape[1]), ff_forward(self, x, *a, **k))[1])
    monkeypatch.setattr(type(pipe.unet), "forward", lambda self, x, *a, **k: (
        calls["unet_rows"].append(x.shape[0]), unet_forward(self, x, *a, **k))[1])
    monkeypatch.setattr(GeneralizedLinearAttention, "_forward_chunked", lambda self, *a: (
        calls.__setitem__("attn_chunked", calls["attn_chunked"] + 1), chunked_attention(self, *a))[1])
    sample = torch.randn(2, 4, 24, 20)
    text = torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = pipe.unet(sample, 10, text).sample
        assert calls == {"unet_rows": [2], "ff_tokens": [480, 120, 480, 480], "attn_chunked": 0,
                         "attn2_tokens": [480, 120, 480, 480]}
        options = MemoryOptions(cfg_batch_size=1, token_chunk_size=37, ff_chunk_size=53)
        with highres.memory_options_applied(pipe.unet, options) as unet:
            chunked = unet(sample, 10, text).sample
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    assert calls["unet_rows"] == [2, 1, 1]
    assert max(calls["ff_tokens"][4:]) == 53 and len(calls["ff_tokens"]) > 8
    assert calls["attn_chunked"] == 2 * 4  # every attn1 of both rows
    assert max(calls["attn2_tokens"][4:]) == 37 and len(calls["attn2_tokens"]) > 8  # every attn2, in chunks
    assert "forward" not in pipe.unet.__dict__  # restored
    assert all(m.token_chunk_size is None for m in pipe.unet.modules() if hasattr(m, "token_chunk_size"))
    assert not any(isinstance(m, highres.TokenChunkedFeedForward) for m in pipe.unet.modules())  # attn2's too


def test_cascade_with_exact_options_matches_unchunked(pipe):
    plain = _generate(pipe)
    options = MemoryOptions(cfg_batch_size=1, token_chunk_size=100, ff_chunk_size=100, vae_tiling="exact",
                            vae_tile_size=5)
    chunked = _generate(pipe, memory=options)
    # Equal up to float rounding (summation order), which may flip an 8-bit rounding.
    assert np.abs(_pixels(chunked) - _pixels(plain)).max() <= 1


def test_sd21_style_cascade_matches_unchunked():
    """Issue 12 names SD-1.5/2.1 and SD-XL pipelines: an SD-2.1-style tiny pipeline (linear
    projections in the transformers, attention upcast, per-level heads, a v-prediction DDIM
    scheduler) runs the cascade with the right stage sizes, and its chunked options (CFG rows,
    attention and feed-forward tokens, exact VAE tiles) equal the unchunked run."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    pipe = tiny_pipeline(seed=2)
    torch.manual_seed(2)
    pipe.unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
        upcast_attention=True).eval()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction",
                                               timestep_spacing="trailing", rescale_betas_zero_snr=False)
    LinFusion.construct_for(pipe, load_pretrained=False)
    from mmfast.models.linfusion import GeneralizedLinearAttention

    assert sum(isinstance(m, GeneralizedLinearAttention) for m in pipe.unet.modules()) == 4  # every attn1: 1 down, 1 mid, 2 up
    out = _generate(pipe, return_stages=True)
    assert [s.image.size for s in out.stages] == [(32, 16), (64, 32), (128, 64)]
    options = MemoryOptions(cfg_batch_size=1, token_chunk_size=100, ff_chunk_size=100, vae_tiling="exact",
                            vae_tile_size=5)
    assert np.abs(_pixels(_generate(pipe, memory=options)) - _pixels(out.image)).max() <= 1
    assert _pixels(out.image).std() > 1


def test_cascade_with_blended_vae_tiles_stays_close(pipe):
    """An approximation (per-tile GroupNorm statistics; a random VAE, 8-latent-px tiles): measured
    ~25 dB against the untiled cascade; a badly stitched result would be far lower."""
    plain = _generate(pipe)
    blended = _generate(pipe, memory=MemoryOptions(vae_tiling="blend", vae_tile_size=8, vae_tile_overlap=2))
    difference = (_pixels(blended) - _pixels(plain)).astype(np.float64)
    psnr = 10 * np.log10(255.0 ** 2 / np.mean(difference ** 2))
    assert 15 < psnr < 60, psnr


def test_cascade_without_upscaling_is_text_to_image(pipe):
    out = _generate(pipe, strengths=(), return_stages=True)
    assert len(out.stages) == 1 and out.image.size == (WIDTH, HEIGHT)


@pytest.mark.parametrize("kwargs, match", [
    (dict(base_size=64), "base long side is 128 / 2\\*\\*2 = 32"),
    (dict(strengths=(0.5, 1.5)), "strengths must be in"),
    (dict(memory=MemoryOptions(), memory_budget_bytes=1 << 30), "not both"),
])
def test_cascade_rejects_bad_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _generate(pipe, **kwargs)


def test_cascade_refuses_batches_and_controlnet_pipelines(pipe):
    with pytest.raises(ValueError, match="one image per call"):
        _generate(pipe, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="output_type cannot be passed through"):
        _generate(pipe, output_type="np")
    from mmfast.testing.tiny_diffusers import tiny_controlnet_pipeline

    with pytest.raises(TypeError, match="ControlNet pipelines are not supported"):
        _generate(tiny_controlnet_pipeline(seed=0))


def test_cascade_keeps_accelerate_hooks_and_progress_settings(pipe):
    """An offload hook on the UNet (enable_model_cpu_offload installs one) runs and stays installed."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    add_hook_to_module(pipe.unet, Counting())
    pipe.set_progress_bar_config(leave=False)
    try:
        _generate(pipe, strengths=(0.5,), memory=MemoryOptions(cfg_batch_size=1))
        assert Counting.calls == 2 * (4 + 2)  # every UNet call, one per CFG row
        assert "forward" in pipe.unet.__dict__ and hasattr(pipe.unet, "_hf_hook")
        assert pipe._progress_bar_config == {"leave": False}  # the stage labels are gone
    finally:
        remove_hook_from_module(pipe.unet)
        pipe.set_progress_bar_config()


def test_cascade_progress_settings_reach_every_stage(pipe, monkeypatch):
    """from_pipe left the img2img stages' bars without the pipeline's settings (they printed to
    stderr after set_progress_bar_config(file=...)), and progress=True overrode disable=True."""
    import io

    from diffusers import DiffusionPipeline

    seen = []
    original = DiffusionPipeline.progress_bar

    def spy(self, *args, **kwargs):
        seen.append((type(self).__name__, dict(self._progress_bar_config)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "progress_bar", spy)
    sink = io.StringIO()
    pipe.set_progress_bar_config(file=sink, ncols=40)
    try:
        generate_highres(pipe, "a fox", height=HEIGHT, width=WIDTH, strengths=STRENGTHS, steps=4, seed=0)
        assert [name for name, _ in seen] == ["StableDiffusionPipeline"] + ["StableDiffusionImg2ImgPipeline"] * 2
        assert all(config["file"] is sink and config["ncols"] == 40 and not config["disable"] for _, config in seen)
        assert "stage 2 128x64" in sink.getvalue()
        seen.clear()
        pipe.set_progress_bar_config(disable=True)
        generate_highres(pipe, "a fox", height=HEIGHT, width=WIDTH, strengths=(0.5,), steps=4, seed=0)
        assert len(seen) == 2 and all(config["disable"] for _, config in seen)
    finally:
        pipe.set_progress_bar_config()


def test_cascade_refuses_pass_through_arguments_a_stage_would_ignore(pipe):
    """SD's img2img __call__ has no guidance_rescale and swallows it (**kwargs): the upscaling
    stages ran without it, silently."""
    with pytest.raises(ValueError, match="guidance_rescale is not a parameter of StableDiffusionImg2ImgPipeline"):
        _generate(pipe, guidance_rescale=0.7)
    with pytest.raises(ValueError, match="not_an_argument is not a parameter of StableDiffusionPipeline"):
        _generate(pipe, strengths=(), not_an_argument=1)
    _generate(pipe, strengths=(), guidance_rescale=0.7)  # text-to-image alone takes it
    _generate(pipe, eta=0.5)  # a parameter of both
    steps = []  # diffusers' deprecated callback arguments, which its pipelines take through **kwargs
    with pytest.warns(FutureWarning):
        _generate(pipe, callback=lambda step, timestep, latents: steps.append(step), callback_steps=1)
    assert len(steps) == 4 + 2 + 2

    class Wrapped(type(pipe)):  # a subclass whose __call__ names nothing: its base's parameters count
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    wrapped = Wrapped(**pipe.components)
    highres._check_pass_through([wrapped], {"eta": 0.5})
    with pytest.raises(ValueError, match="guidance_rescal is not a parameter of Wrapped"):
        highres._check_pass_through([wrapped], {"guidance_rescal": 0.5})


def test_sd_fp16_vae_stays_fp16_as_in_diffusers(pipe):
    """AutoencoderKL defaults force_upcast to True, but diffusers' SD-1.5 / 2.1 pipelines never read
    it (only SD-XL's do): mmfast ran their fp16 VAEs in fp32, twice the decode memory."""
    import copy

    vae = copy.deepcopy(pipe.vae).to(torch.float16)
    assert vae.config.force_upcast  # the default, as in SD-1.5 configs without the key
    fp16 = type(pipe)(**{**pipe.components, "vae": vae})
    assert not highres.vae_needs_upcast(fp16)
    with highres.vae_precision(fp16) as dtype:
        assert dtype == torch.float16 and vae.dtype == torch.float16
    plain = estimate_stage_memory(fp16, index=1, height=HEIGHT, width=WIDTH)
    vae.register_to_config(force_upcast=False)
    assert estimate_stage_memory(fp16, index=1, height=HEIGHT, width=WIDTH).decode_bytes == plain.decode_bytes


def test_the_vae_bar_takes_the_pipelines_settings(pipe):
    """With exact VAE tiling the cascade shows a bar over the VAE's layers: it went to stderr
    whatever set_progress_bar_config said, which the stage bars follow."""
    import io

    sink = io.StringIO()
    pipe.set_progress_bar_config(file=sink)
    try:
        generate_highres(pipe, "a fox", height=HEIGHT, width=WIDTH, strengths=(0.5,), steps=4, seed=0,
                         memory=MemoryOptions(vae_tiling="exact", vae_tile_size=8))
    finally:
        pipe.set_progress_bar_config()
    text = sink.getvalue()
    assert "VAE decode" in text and "VAE encode" in text and "stage 1" in text


def test_cascade_rejects_sizes_that_do_not_halve():
    with pytest.raises(ValueError, match="divisible by 16"):
        highres.cascade_sizes(60, 128, 2, multiple=4)
    # base_size fits the multiple, the short side does not: the hint is about height and width
    with pytest.raises(ValueError, match=r"height x width 1536x2048 .*stage 96x128 fails\): pick height and width"):
        highres.cascade_sizes(1536, 2048, 4, base_size=128, multiple=64)
    with pytest.raises(ValueError, match="pick base_size a multiple of 64"):
        highres.cascade_sizes(1600, 1600, 4, base_size=100, multiple=64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cfg_batch_size=0), "cfg_batch_size must be None or an int >= 1"),
    (dict(ff_chunk_size=2.5), "ff_chunk_size"),
    (dict(vae_tiling="tiles"), "vae_tiling must be one of"),
    (dict(vae_tile_size=16), "vae_tile_size needs vae_tiling"),
    (dict(vae_tiling="blend", vae_tile_size=0), "vae_tile_size must be None or an int >= 1"),
    (dict(vae_tiling="exact", vae_tile_overlap=2), "applies to vae_tiling='blend' only"),
    (dict(vae_tiling="blend", vae_tile_size=8, vae_tile_overlap=8), "0 <= overlap < 8"),
    (dict(vae_tiling="blend", vae_offload_device="cpu"), "vae_offload_device applies"),
    (dict(cfg_batch_size=True), "cfg_batch_size must be None or an int >= 1"),  # a bool is not a count
])
def test_memory_options_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryOptions(**kwargs)


def test_numbers_in_the_forms_users_pass_them(pipe):
    """Found by a new-user trial: numpy ints were refused (steps, token_chunk_size) while a bool was
    taken as a batch size, a dict as `memory` failed deep inside with AttributeError, and a str
    height with a bare comparison error."""
    assert MemoryOptions(token_chunk_size=np.int64(64), vae_tiling="blend", vae_tile_size=np.int32(8)).token_chunk_size == 64
    # ... and reach the VAE passes (which refused numpy ints after stage 0 had run)
    for options in (MemoryOptions(vae_tiling="blend", vae_tile_size=np.int32(8), vae_tile_overlap=np.int64(2)),
                    MemoryOptions(vae_tiling="exact", vae_tile_size=np.int64(8))):
        _generate(pipe, strengths=(0.5,), memory=options)
    highres.check_strengths((0.5,), np.int64(10))
    with pytest.raises(TypeError, match=r"memory must be a MemoryOptions \(MemoryOptions\(\*\*options\)\)"):
        _generate(pipe, memory={"cfg_batch_size": 1})
    for height in ("128", 128.0):
        with pytest.raises(TypeError, match="height must be an int"):
            highres.cascade_sizes(height, 128, 2)
    with pytest.raises(ValueError, match="height must be >= 1"):
        highres.cascade_sizes(0, 128, 2)
    with pytest.raises(TypeError, match="generate_highres: height must be an int"):
        generate_highres(pipe, "a fox", height="128", width=WIDTH, strengths=STRENGTHS, steps=4, progress=False)


def test_token_chunks_need_linfusion():
    pipe = tiny_pipeline(seed=1)
    with pytest.raises(ValueError, match="mount LinFusion first"):
        with highres.memory_options_applied(pipe.unet, MemoryOptions(token_chunk_size=8)):
            pass


# --- the memory model ------------------------------------------------------------------------


def test_memory_model_shrinks_with_the_options(pipe):
    plain = estimate_highres_memory(pipe, height=HEIGHT, width=WIDTH, strengths=STRENGTHS)
    light = estimate_stage_memory(pipe, index=2, height=HEIGHT, width=WIDTH,
                                  options=MemoryOptions(cfg_batch_size=1, token_chunk_size=512, ff_chunk_size=512,
                                                        vae_tiling="blend", vae_tile_size=8))
    assert [(s.height, s.width) for s in plain] == [(16, 32), (32, 64), (64, 128)]
    assert plain[0].encode_bytes == 0 and plain[1].encode_bytes > 0
    assert all(a.denoise_bytes < b.denoise_bytes for a, b in zip(plain, plain[1:]))  # grows with the size
    assert light.denoise_bytes < plain[-1].denoise_bytes / 2
    assert light.decode_bytes < plain[-1].decode_bytes
    assert plain[-1].peak_bytes == plain[-1].weights_bytes + plain[-1].carried_bytes + plain[-1].stage_bytes


def test_planner_picks_the_lightest_options_that_fit(pipe):
    ample = plan_memory_options(pipe, height=HEIGHT, width=WIDTH, budget_bytes=1 << 40)
    assert ample == MemoryOptions()
    plain = estimate_highres_memory(pipe, height=HEIGHT, width=WIDTH, strengths=STRENGTHS)[-1]
    tight = plan_memory_options(pipe, height=HEIGHT, width=WIDTH, budget_bytes=plain.peak_bytes - 1)
    assert tight != MemoryOptions()
    with pytest.raises(ValueError, match=r"no memory options fit 1\.00 KiB(.|\n)*: \d+\.\d\d [KM]iB"):
        plan_memory_options(pipe, height=HEIGHT, width=WIDTH, budget_bytes=1024)  # a tiny model: not "0.00 GiB"


def test_cascade_under_a_memory_budget_uses_planned_options(pipe):
    plain = estimate_highres_memory(pipe, height=HEIGHT, width=WIDTH, strengths=STRENGTHS)
    out = _generate(pipe, memory_budget_bytes=plain[-1].peak_bytes - 1, return_stages=True)
    assert out.stages[0].options == MemoryOptions()  # the small stage fits unchunked
    assert out.stages[-1].options != MemoryOptions()


@pytest.mark.parametrize("linfusion", [True, False], ids=["linfusion", "sdpa"])
@pytest.mark.parametrize("options", [MemoryOptions(), MemoryOptions(vae_tiling="blend", vae_tile_size=16),
                                     MemoryOptions(cfg_batch_size=1, vae_tiling="exact", vae_tile_size=8)],
                         ids=["plain", "blend", "exact"])
def test_memory_model_of_a_meta_pipeline_equals_the_loaded_one(pipe, linfusion, options):
    """A pipeline built under accelerate.init_empty_weights (no weights: a 16K plan without
    loading SD-XL) is predicted as the loaded one. Traced on meta, SDPA took its math path: the
    VAE phases came out 40-250x too large at 256 x 512 px."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        empty = tiny_pipeline(seed=0)
    loaded = pipe
    if not linfusion:
        loaded = tiny_pipeline(seed=0)
    else:
        LinFusion.construct_for(empty, load_pretrained=False)
    assert empty.unet.device.type == "meta" and empty.vae.device.type == "meta"
    kwargs = dict(height=HEIGHT, width=WIDTH, strengths=STRENGTHS, options=options)
    assert estimate_highres_memory(empty, **kwargs) == estimate_highres_memory(loaded, **kwargs)
    assert all(p.is_meta for p in empty.vae.parameters()) and all(p.is_meta for p in empty.unet.parameters())


def test_empty_pipeline_from_a_directory_plans_as_the_loaded_one(tmp_path):
    """empty_pipeline(dir): the models built from their configs on meta (no weights read), the
    tokenizer and scheduler loaded; its prediction equals the loaded pipeline's, in fp16 too."""
    from diffusers import StableDiffusionPipeline

    from mmfast.models.linfusion import empty_pipeline

    tiny_pipeline(seed=0).save_pretrained(tmp_path)
    for dtype in (None, torch.float16):
        empty = empty_pipeline(str(tmp_path), torch_dtype=dtype)
        loaded = StableDiffusionPipeline.from_pretrained(tmp_path, torch_dtype=dtype, local_files_only=True)
        for pipeline in (empty, loaded):
            LinFusion.construct_for(pipeline, load_pretrained=False)
        assert all(p.is_meta for name in ("unet", "vae", "text_encoder") for p in getattr(empty, name).parameters())
        assert empty.unet.dtype == loaded.unet.dtype == (dtype or torch.float32)
        assert empty.tokenizer("a fox").input_ids == loaded.tokenizer("a fox").input_ids
        kwargs = dict(height=HEIGHT, width=WIDTH, strengths=STRENGTHS)
        assert estimate_highres_memory(empty, **kwargs) == estimate_highres_memory(loaded, **kwargs)
    # partly loaded: a real UNet with the VAE and text encoder still on meta (they go to its device)
    partly = StableDiffusionPipeline(**{**loaded.components, "vae": empty.vae, "text_encoder": empty.text_encoder})
    assert estimate_highres_memory(partly, **kwargs) == estimate_highres_memory(loaded, **kwargs)
    with pytest.raises(FileNotFoundError, match="model_index.json not found; expected a diffusers pipeline"):
        empty_pipeline(str(tmp_path / "unet"))


_MEASURE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from mmfast.models.linfusion import LinFusion, MemoryOptions, estimate_highres_memory, generate_highres
    from mmfast.testing.tiny_diffusers import tiny_pipeline
    torch.set_num_threads(1)
    pipe = tiny_pipeline(seed=0)
    LinFusion.construct_for(pipe, load_pretrained=False)
    options = MemoryOptions(**json.loads(sys.argv[1]))
    kwargs = dict(height=256, width=512, strengths=(0.5,), steps=2, progress=False, memory=options)
    generate_highres(pipe, "a red fox", **kwargs)  # first calls fill library caches (oneDNN primitives, ...)
    out = generate_highres(pipe, "a red fox", return_stages=True, **kwargs)
    predicted = estimate_highres_memory(pipe, height=256, width=512, strengths=(0.5,), options=options)
    print(json.dumps([[s.stage_memory_bytes, p.stage_bytes] for s, p in zip(out.stages, predicted)]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures the peak RSS from /proc")
@pytest.mark.parametrize("options", [{}, {"cfg_batch_size": 1, "token_chunk_size": 8192, "ff_chunk_size": 8192,
                                          "vae_tiling": "blend", "vae_tile_size": 64}])
def test_memory_model_predicts_the_measured_peak(options):
    """Predicted stage peak within 25% of the measured peak RSS growth at every stage: the base
    (128 x 256 px: 27-53 MB) and the upscaling one (256 x 512 px: 60-210 MB), measured on the
    second cascade of the process (the first one's stages also hold tens of MB of first-call
    library caches the model does not see: the base stage came out at 0.55-0.69x then; 1.00-1.05x
    on later calls). A fresh process whose malloc returns every freed block above 64 KiB to the
    system, so the resident set follows the live tensors (glibc otherwise keeps freed blocks
    resident)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _MEASURE_SCRIPT, json.dumps(options)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads(result.stdout.strip().splitlines()[-1])
    if any(measured is None for measured, _ in stages):  # /proc/self/clear_refs forbidden (some sandboxes)
        pytest.skip("no peak-RSS measurement here (PeakMemory.peak_bytes is None)")
    assert len(stages) == 2 and all(0.75 <= predicted / measured <= 1.25 for measured, predicted in stages), stages


_VAE_MEASURE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from mmfast.memory import PeakMemory
    from mmfast.models import vae_tiling
    from mmfast.models.linfusion import MemoryOptions, highres
    from mmfast.models.linfusion.highres_memory import _vae_pass_bytes
    from mmfast.testing.tiny_diffusers import tiny_pipeline
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    vae = tiny_pipeline(seed=0).vae
    options = MemoryOptions(**json.loads(sys.argv[1]))
    encode = sys.argv[2] == "encode"
    kwargs = highres.vae_tiling_kwargs(options, encode, 2)
    shape = (1, 3, 512, 512) if encode else (1, 4, 256, 256)
    def run():
        x = torch.randn(shape)  # inside the measurement: the trace counts its input too
        return vae_tiling.encode_images(vae, x, **kwargs) if encode else vae_tiling.decode_latents(vae, x, **kwargs)
    run()
    with PeakMemory("cpu") as meter:
        run()
    print(json.dumps([meter.peak_bytes, _vae_pass_bytes(vae, options, encode, 1, 512, 512, 2)]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures the peak RSS from /proc")
@pytest.mark.parametrize("direction", ["decode", "encode"])
@pytest.mark.parametrize("options", [{}, {"vae_tiling": "blend", "vae_tile_size": 64},
                                     {"vae_tiling": "exact", "vae_tile_size": 32}], ids=["none", "blend", "exact"])
def test_memory_model_predicts_vae_passes(options, direction):
    """The VAE phases of the model (untiled and exact traced, blend modelled from one traced tile)
    within 25% of the measured peak RSS growth of the pass (512 px: ~20-100 MB)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _VAE_MEASURE_SCRIPT, json.dumps(options), direction], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured, predicted = json.loads(result.stdout.strip().splitlines()[-1])
    if measured is None:
        pytest.skip("no peak-RSS measurement here (PeakMemory.peak_bytes is None)")
    assert 0.75 <= predicted / measured <= 1.25, (predicted, measured)


# --- row-parallel stages over 2 gloo ranks ---------------------------------------------------


def _row_parallel_worker(rank, world_size, init_method, result_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        from mmfast.models.linfusion import row_parallel

        pipe = tiny_pipeline(seed=0)
        LinFusion.construct_for(pipe, load_pretrained=False)
        convs = []
        conv_forward = row_parallel.RowParallelConv2d.forward
        row_parallel.RowParallelConv2d.forward = lambda self, x: (convs.append(x.shape[2]), conv_forward(self, x))[1]
        image = _generate(pipe, memory=MemoryOptions(cfg_batch_size=1))  # row_parallel: automatic
        np.save(os.path.join(result_dir, f"rank{rank}.npy"), _pixels(image))
        np.save(os.path.join(result_dir, f"convs{rank}.npy"), np.array(convs))
        try:  # every rank must run the same cascade: another seed per rank is refused
            generate_highres(pipe, "a red fox", height=HEIGHT, width=WIDTH, strengths=STRENGTHS, steps=4,
                             generator=torch.Generator().manual_seed(rank), progress=False)
            refused = ""
        except RuntimeError as error:
            refused = str(error)
        np.save(os.path.join(result_dir, f"refused{rank}.npy"), np.array(refused))
    finally:
        dist.destroy_process_group()


def test_row_parallel_cascade_equals_one_process(tmp_path, pipe):
    """Every UNet call of every stage split by latent rows over 2 ranks gives one process's image."""
    import torch.multiprocessing as mp

    mp.spawn(_row_parallel_worker, args=(2, rendezvous(tmp_path), str(tmp_path)), nprocs=2, join=True)
    single = _pixels(_generate(pipe))
    for rank in range(2):
        assert np.abs(np.load(tmp_path / f"rank{rank}.npy") - single).max() <= 1
        convs = np.load(tmp_path / f"convs{rank}.npy")
        assert len(convs) > 0 and convs.max() == 32 // 2  # bands: half of the last stage's 32 latent rows
        assert "ranks hold different latents" in str(np.load(tmp_path / f"refused{rank}.npy"))


def test_row_parallel_refuses_token_chunks(pipe):
    with pytest.raises(ValueError, match="does not combine with row_parallel"):
        with highres.memory_options_applied(pipe.unet, MemoryOptions(token_chunk_size=64), row_parallel=True):
            pass


def test_row_parallel_needs_a_process_group(pipe):
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        _generate(pipe, row_parallel=True)


# --- safe default dtypes per model family ------------------------------------------------


def _family_unet(cross_attention_dim):
    from mmfast.testing.tiny_diffusers import tiny_unet

    return tiny_unet((32, 64), cross_attention_dim=cross_attention_dim)


@pytest.mark.parametrize("cross_attention_dim, family, gpu_dtype", [
    (768, "sd15", torch.float16), (1024, "sd21", torch.bfloat16), (32, "unknown", torch.bfloat16),
])
def test_recommended_dtype_per_family(cross_attention_dim, family, gpu_dtype):
    from mmfast.models.linfusion import recommended_dtype, unet_family

    unet = _family_unet(cross_attention_dim)
    assert unet_family(unet) == family
    assert recommended_dtype(unet, "cuda") == gpu_dtype
    assert recommended_dtype(unet, "cpu") == torch.float32


@pytest.mark.parametrize("widths, family", [([768, 768], "sd15"), ((1024,), "sd21"), ([768, 1024], "unknown")])
def test_unet_family_of_per_block_text_widths(widths, family):
    from mmfast.models.linfusion import unet_family

    assert unet_family({"cross_attention_dim": widths}) == family


def test_sdxl_is_recognised_and_fp16():
    from mmfast.models.linfusion import recommended_dtype, unet_family
    from mmfast.testing.tiny_diffusers import tiny_sdxl_unet

    unet = tiny_sdxl_unet()
    assert unet_family(unet) == "sdxl" and recommended_dtype(unet, "cuda") == torch.float16


def test_mounting_on_an_fp16_sd21_unet_warns():
    unet = _family_unet(1024).half()
    with pytest.warns(UserWarning, match="use torch.bfloat16"):
        LinFusion.construct_for(unet, load_pretrained=False)
    sd15 = _family_unet(768).half()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LinFusion.construct_for(sd15, load_pretrained=False)


def test_peak_memory_measures_no_device_but_cpu_and_cuda():
    """PeakMemory("meta") (or xpu, ...) reported the host's resident-set growth as that device's
    peak (found by the support-module audit); it measures nothing there: None."""
    from mmfast.memory import PeakMemory

    with PeakMemory("meta") as meter:
        torch.empty(1 << 28, device="meta")
        host = torch.ones(1 << 22)  # 16 MiB on the host, not the meta device's
    assert meter.peak_bytes is None and host.numel() == 1 << 22
