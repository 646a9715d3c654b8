"""DiffDIS on mmfast: the UNet's added parts (BDE, DBIA, SWCI) against their definitions, the
one-step formula against diffusers' scheduler, the pipeline (mask_only, bf16, TTA, checkpoints,
bad input) and the linear-attention option, on tiny random models (CPU)."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from mmfast.models.diffdis import (DiffDISPipeline, DiffDISUNet, batch_discriminative_embedding,  # noqa: E402
                                   encode_empty_prompt, one_step_x0, swap_halves, top_level_attn1_names)
from mmfast.models.linfusion import LinFusionDistiller  # noqa: E402
from mmfast.testing.tiny_diffdis import (SD_TURBO_SCHEDULER, save_tiny_diffdis_checkpoint,  # noqa: E402
                                         sd21_unet_config, tiny_diffdis_pipeline, tiny_diffdis_unet,
                                         tiny_unet_config)

# The released checkpoint's keys beyond a stock SD-2.1 UNet (reference diffdis.md, section 1.9).
MID = "mid_block.attentions.0.transformer_blocks.0."
OFFICIAL_EXTRA_KEYS = {
    "class_embedding.linear_1.weight": (1280, 4), "class_embedding.linear_1.bias": (1280,),
    "class_embedding.linear_2.weight": (1280, 1280), "class_embedding.linear_2.bias": (1280,),
    **{f"{MID}attn3.{p}.weight": (1280, 1280) for p in ("to_q", "to_k", "to_v")},
    f"{MID}attn3.to_out.0.weight": (1280, 1280), f"{MID}attn3.to_out.0.bias": (1280,),
    f"{MID}norm2_.weight": (1280,), f"{MID}norm2_.bias": (1280,),
}
for _j, _c in enumerate((320, 640, 1280)):
    OFFICIAL_EXTRA_KEYS.update({
        f"rgb_conv.{_j}.0.weight": (_c, 4, 3, 3), f"rgb_conv.{_j}.0.bias": (_c,),
        **{f"rgb_conv.{_j}.1.{b}": (_c,) for b in ("weight", "bias", "running_mean", "running_var")},
        f"rgb_conv.{_j}.1.num_batches_tracked": (),
        f"rgb_proj.{_j}.weight": (_c, _c, 3, 3), f"rgb_proj.{_j}.bias": (_c,),
        f"rgb_proj1.{_j}.weight": (_c, _c, 3, 3), f"rgb_proj1.{_j}.bias": (_c,),
    })

RESOLUTION = 128  # tiny models: 16 x 16 latent


def unet_inputs(unet, batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2 * batch, 8, size, size, generator=g)
    context = torch.randn(2 * batch, 2, unet.config.cross_attention_dim, generator=g)
    rgb = [torch.randn(batch, 4, size >> k, size >> k, generator=g) for k in (1, 2, 3)]
    return sample, context, rgb


def image(seed=0, height=70, width=90):
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pipe():
    return tiny_diffdis_pipeline()


# --- the UNet --------------------------------------------------------------------------------


def test_full_size_config_has_exactly_the_official_extra_keys():
    from diffusers import UNet2DConditionModel

    config = sd21_unet_config()
    with torch.device("meta"):
        unet = DiffDISUNet.from_config(config)
        stock = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    state, stock_state = unet.state_dict(), stock.state_dict()
    extra = {key: tuple(value.shape) for key, value in state.items() if key not in stock_state}
    assert extra == OFFICIAL_EXTRA_KEYS
    assert set(stock_state) <= set(state) and len(state) == 730
    changed = {key for key in stock_state if state[key].shape != stock_state[key].shape}
    assert changed == {"conv_in.weight"} and tuple(state["conv_in.weight"].shape) == (320, 8, 3, 3)
    assert sum(p.numel() for p in unet.parameters()) == 912_924_804


def test_config_is_checked():
    with pytest.raises(ValueError, match="addition_embed_type"):
        DiffDISUNet.from_config({**tiny_unet_config(), "addition_embed_type": "text"})
    with pytest.raises(ValueError, match="SWCI needs"):
        DiffDISUNet.from_config({**tiny_unet_config(), "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                                 "block_out_channels": [32, 64], "attention_head_dim": [2, 4]})


def test_bde_rows():
    labels = batch_discriminative_embedding(2)
    mask, edge = [0.0, np.sin(1), 1.0, np.cos(1)], [np.sin(1), 0.0, np.cos(1), 1.0]
    torch.testing.assert_close(labels, torch.tensor([mask, mask, edge, edge], dtype=torch.float32))


def test_dbia_attends_to_the_other_halfs_keys_and_values():
    unet = tiny_diffdis_unet()
    block = unet.mid_block.attentions[0].transformer_blocks[0]
    attn = block.attn3
    x = torch.randn(4, 5, attn.to_q.in_features)
    with torch.no_grad():
        actual = attn(x, encoder_hidden_states=swap_halves(x))
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        heads = lambda t: t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        out = torch.cat([F.scaled_dot_product_attention(q[:2], k[2:], v[2:]),
                         F.scaled_dot_product_attention(q[2:], k[:2], v[:2])])
        expected = attn.to_out[0](out.transpose(1, 2).flatten(2))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_dbia_block_order_and_processor_independence():
    """attn1 -> attn3 (DBIA) -> attn2 -> FF, each with its residual; and a processor set on every
    layer (the fork's pitfall) keeps the half swap, since it lives in the block, not the processor."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_diffdis_unet()
    block = unet.mid_block.attentions[0].transformer_blocks[0]
    x, context = torch.randn(4, 6, block.norm1.normalized_shape[0]), torch.randn(4, 2, 32)
    with torch.no_grad():
        h = block.attn1(block.norm1(x)) + x
        n = block.norm2_(h)
        h = block.attn3(n, encoder_hidden_states=torch.cat([n[2:], n[:2]])) + h
        h = block.attn2(block.norm2(h), encoder_hidden_states=context) + h
        expected = block.ff(block.norm3(h)) + h
        torch.testing.assert_close(block(x, encoder_hidden_states=context), expected)
        sample, ctx, rgb = unet_inputs(unet)
        before = unet(sample, 999, ctx, rgb_latents=rgb).sample
        unet.set_attn_processor(AttnProcessor())
        torch.testing.assert_close(unet(sample, 999, ctx, rgb_latents=rgb).sample, before, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="must be even"):
        swap_halves(torch.zeros(3, 2))


def _capture(unet):
    down, up = {}, {}
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: down.__setitem__(i, out))
             for i, block in enumerate(unet.down_blocks)]
    hooks += [block.register_forward_pre_hook(lambda m, args, kwargs, i=i: up.__setitem__(i, (args, kwargs)),
                                              with_kwargs=True) for i, block in enumerate(unet.up_blocks)]
    return down, up, hooks


def test_swci_modulates_only_the_skip_connections():
    unet = tiny_diffdis_unet()
    sample, context, rgb = unet_inputs(unet)
    down, up, hooks = _capture(unet)
    with torch.no_grad():
        unet(sample, 999, context, rgb_latents=rgb)
        for hook in hooks:
            hook.remove()
        for j in range(3):
            hidden, skips = down[j]
            torch.testing.assert_close(hidden, skips[-1])  # the next block gets the unmodulated tensor
            features = unet.rgb_conv[j](rgb[j]).repeat(2, 1, 1, 1)
            expected = skips[-1] * (1 + unet.rgb_proj[j](features)) + unet.rgb_proj1[j](features)
            # layers_per_block=1: up block 2 - j receives down block j's last skip first.
            received = up[2 - j][0][1][0]
            torch.testing.assert_close(received, expected, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(received, skips[-1])
        torch.testing.assert_close(up[3][0][1][1], down[0][1][0])  # the other skips untouched


def test_rgb_latents_of_one_half_equal_both_halves():
    unet = tiny_diffdis_unet()
    sample, context, rgb = unet_inputs(unet)
    with torch.no_grad():
        shared = unet(sample, 999, context, rgb_latents=rgb).sample
        repeated = unet(sample, 999, context, rgb_latents=[r.repeat(2, 1, 1, 1) for r in rgb]).sample
    torch.testing.assert_close(shared, repeated)


def test_mask_only_gives_the_mask_rows_of_the_full_call():
    unet = tiny_diffdis_unet()
    sample, context, rgb = unet_inputs(unet, batch=2)
    with torch.no_grad():
        full = unet(sample, 999, context, rgb_latents=rgb).sample
        mask = unet(sample, 999, context, rgb_latents=rgb, mask_only=True).sample
    assert mask.shape[0] == 2
    # Identical up to rounding: the up path runs at batch 2 instead of 4 (kernel blocking differs).
    torch.testing.assert_close(mask, full[:2], rtol=1e-5, atol=1e-5)


def test_unet_rejects_bad_inputs():
    unet = tiny_diffdis_unet()
    sample, context, rgb = unet_inputs(unet)
    with pytest.raises(ValueError, match=r"sample must be \(2B, 8, h, w\)"):
        unet(sample[:3], 999, context[:3], rgb_latents=rgb)
    with pytest.raises(ValueError, match="multiples of 8"):
        unet(sample[..., :12, :12], 999, context, rgb_latents=rgb)
    with pytest.raises(ValueError, match="rgb_latents must be the 3"):
        unet(sample, 999, context, rgb_latents=rgb[:2])
    with pytest.raises(ValueError, match=r"rgb_latents\[1\] must be"):
        unet(sample, 999, context, rgb_latents=[rgb[0], rgb[0], rgb[2]])


def test_init_from_sd_unet_follows_the_training_recipe():
    from diffusers import UNet2DConditionModel

    config = tiny_unet_config()
    torch.manual_seed(1)
    sd = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    unet = DiffDISUNet.from_config(config)
    unet.init_from_sd_unet(sd)
    torch.testing.assert_close(unet.conv_in.weight, sd.conv_in.weight.repeat(1, 2, 1, 1) * 0.5)
    block, sd_block = unet.mid_block.attentions[0].transformer_blocks[0], sd.mid_block.attentions[0].transformer_blocks[0]
    torch.testing.assert_close(block.attn3.to_q.weight, sd_block.attn1.to_q.weight)
    torch.testing.assert_close(block.norm2_.weight, sd_block.norm1.weight)
    assert all((p == 0).all() for p in unet.rgb_proj.parameters())


# --- one step -------------------------------------------------------------------------------


def test_one_step_equals_ddpm_scheduler_step_at_999():
    from diffusers import DDPMScheduler

    # Small eps/x_t differences keep part of x0 inside [-1, 1]: both branches of the clip are checked.
    x_t = torch.randn(2, 4, 8, 8)
    eps = x_t * 0.0684 + 0.05 * torch.randn(2, 4, 8, 8)
    # sd-turbo's config (clip_sample false): the unclipped formula, as the reference measured.
    scheduler = DDPMScheduler.from_config(SD_TURBO_SCHEDULER)
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999]
    expected = scheduler.step(eps, 999, x_t).prev_sample  # its added variance at t=999 is sqrt(1e-20)
    assert not scheduler.config.clip_sample and (expected.abs() > 1).any()
    alpha_bar = float(scheduler.alphas_cumprod[999])
    assert abs(alpha_bar - 0.0046601) < 1e-6
    unclipped = one_step_x0(x_t, eps, alpha_bar)
    torch.testing.assert_close(unclipped, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unclipped, (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5)
    assert tiny_diffdis_pipeline().clip_sample_range is None
    # A config with clip_sample true (DDPMScheduler's default) clips, and the pipeline follows it.
    clipping = DDPMScheduler.from_config({**SD_TURBO_SCHEDULER, "clip_sample": True})
    clipping.set_timesteps(1)
    expected = clipping.step(eps, 999, x_t).prev_sample
    assert 0 < (expected.abs() < 1).float().mean() < 1
    torch.testing.assert_close(one_step_x0(x_t, eps, alpha_bar, 1.0), expected, rtol=1e-5, atol=1e-5)
    pipe = tiny_diffdis_pipeline()
    assert type(pipe)(pipe.unet, pipe.vae, clipping, pipe.empty_text_embedding).clip_sample_range == 1.0
    # diffusers' default spacing ("leading") steps at t = 1, SD-2.1's at 1 too: refused, not silently run
    for spacing in ({}, {"timestep_spacing": "leading", "steps_offset": 1}):
        config = {key: value for key, value in SD_TURBO_SCHEDULER.items() if key != "timestep_spacing"}
        with pytest.raises(ValueError, match="one step of this scheduler runs at t = [01]; DiffDIS is trained at "
                                             "t = 999 only: use timestep_spacing='trailing'"):
            type(pipe)(pipe.unet, pipe.vae, DDPMScheduler.from_config({**config, **spacing}),
                       pipe.empty_text_embedding)


# --- the pipeline ---------------------------------------------------------------------------


def test_tta_view_sizes_are_distinct_at_every_resolution():
    """Round-half-even made all three views 128 at resolution 128 (the --tiny example's 6-view TTA
    ran one size); the official 768 / 1024 / 1280 at 1024 are kept."""
    from mmfast.models.diffdis.pipeline import _view_size

    assert [_view_size(1024, s) for s in (0.75, 1.0, 1.25)] == [768, 1024, 1280]
    assert [_view_size(128, s) for s in (0.75, 1.0, 1.25)] == [64, 128, 192]
    assert [_view_size(512, s) for s in (0.75, 1.0, 1.25)] == [384, 512, 640]
    assert [_view_size(832, s) for s in (0.75, 1.0, 1.25)] == [640, 832, 1024]  # no tie: the nearest
    assert [_view_size(576, s) for s in (0.75, 1.0, 1.25)] == [448, 576, 704]


def test_fused_qkv_projections_keep_the_maps():
    """diffusers' fuse_qkv_projections gave the DBIA attention (attn3, a cross-attention of
    self-attention's shapes) a to_qkv where its call needs to_kv: AttributeError."""
    fused = tiny_diffdis_pipeline()
    expected = fused.segment(image(), resolution=64, generator=torch.Generator().manual_seed(0))
    fused.unet.fuse_qkv_projections()
    out = fused.segment(image(), resolution=64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.masks[0], expected.masks[0], rtol=0, atol=1e-5)


def test_segment_shapes_and_range(pipe):
    out = pipe.segment([image(0), image(1, 64, 40)], resolution=RESOLUTION, batch_size=2)
    assert [tuple(m.shape) for m in out.masks] == [(70, 90), (64, 40)]
    assert [tuple(e.shape) for e in out.edges] == [(70, 90), (64, 40)]
    for m in out.masks + out.edges:
        assert m.dtype == torch.float32 and m.min() >= 0 and m.max() <= 1 and m.max() - m.min() > 0.1


def test_input_resize_matches_pils_bilinear_resize():
    """DiffDIS resizes the uint8 image with PIL's bilinear filter (antialiased when shrinking):
    thin lines in a 3072 x 2048 image alias under a plain bilinear interpolate (the maps then
    differ from the official ones), not here; upsampling matches too."""
    from PIL import Image

    from mmfast.models.diffdis.pipeline import as_rgb_images, resize_input

    pixels = np.full((2048, 3072, 3), 200, np.uint8)
    pixels[::7] = 10  # 1-pixel lines
    pixels[:, ::11, 1] = 30
    for array, size in ((pixels, 1024), (pixels[:300, :500], 1024), (pixels[:700, :900], 256)):
        array = np.ascontiguousarray(array)
        ours = resize_input(as_rgb_images(Image.fromarray(array))[0], size)[0]
        torch.testing.assert_close(ours, official_resize(array, size), rtol=0, atol=2.5 / 255)  # PIL: uint8
    plain = F.interpolate(as_rgb_images(pixels)[0][None], size=(1024, 1024), mode="bilinear")[0] * 2 - 1
    assert (plain - official_resize(pixels, 1024)).abs().mean() > 20 / 255  # what antialiasing avoids


def official_resize(pixels: np.ndarray, size: int) -> torch.Tensor:
    """run_inference.py's input: PIL bilinear resize of the uint8 image, then rgb / 255 * 2 - 1."""
    from PIL import Image

    resized = np.array(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))
    return torch.from_numpy(resized).permute(2, 0, 1).float() / 255 * 2 - 1


def test_segment_refuses_a_dtype_given_as_a_string(pipe):
    with pytest.raises(TypeError, match=r"DiffDISPipeline: dtype must be a torch.dtype .*\(torch.bfloat16\?\)"):
        pipe.segment(image(), resolution=RESOLUTION, dtype="bfloat16")


def test_segment_mask_only_gives_the_same_mask(pipe):
    full = pipe.segment(image(), resolution=RESOLUTION, generator=torch.Generator().manual_seed(3))
    mask = pipe.segment(image(), resolution=RESOLUTION, mask_only=True, generator=torch.Generator().manual_seed(3))
    assert mask.edges is None
    torch.testing.assert_close(mask.masks[0], full.masks[0], rtol=0, atol=1e-5)


def test_segment_memory_formats_give_the_same_maps():
    pipe = tiny_diffdis_pipeline()
    assert pipe.memory_format == torch.channels_last  # the default: oneDNN's and cuDNN's native layout
    for conv in (pipe.unet.conv_in, pipe.unet.rgb_conv[0][0], pipe.vae.encoder.conv_in, pipe.vae.decoder.conv_out):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    channels_last = pipe.segment(image(), resolution=RESOLUTION, generator=torch.Generator().manual_seed(3))
    pipe.to(memory_format=torch.contiguous_format)
    assert pipe.memory_format == torch.contiguous_format and pipe.vae.decoder.conv_out.weight.is_contiguous()
    nchw = pipe.segment(image(), resolution=RESOLUTION, generator=torch.Generator().manual_seed(3))
    for a, b in zip(channels_last.masks + channels_last.edges, nchw.masks + nchw.edges):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="memory_format must be torch.channels_last or torch.contiguous_format"):
        pipe.to(memory_format=torch.preserve_format)


def test_segment_is_deterministic_with_a_generator_and_depends_on_the_noise(pipe):
    a = pipe.segment(image(), resolution=RESOLUTION, generator=torch.Generator().manual_seed(3)).masks[0]
    b = pipe.segment(image(), resolution=RESOLUTION, generator=torch.Generator().manual_seed(3)).masks[0]
    c = pipe.segment(image(), resolution=RESOLUTION, generator=torch.Generator().manual_seed(4)).masks[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-4


def test_segment_bf16_is_close_to_fp32():
    pipe = tiny_diffdis_pipeline()
    fp32 = pipe.segment(image(), resolution=RESOLUTION, generator=torch.Generator().manual_seed(3)).masks[0]
    bf16 = pipe.segment(image(), resolution=RESOLUTION, dtype=torch.bfloat16,
                        generator=torch.Generator().manual_seed(3)).masks[0]
    assert pipe.dtype == torch.bfloat16
    # The documented bf16 tolerance (README): maps in [0, 1] within 0.05 max / 0.01 mean.
    assert (bf16 - fp32).abs().max() < 0.05 and (bf16 - fp32).abs().mean() < 0.01
    with pytest.warns(UserWarning, match="does not restore their float32 values"):
        pipe.segment(image(), resolution=64, dtype=torch.float32)


def test_segment_fp16_warns():
    pipe = tiny_diffdis_pipeline()
    with pytest.warns(UserWarning, match="bfloat16 is the safe"):
        try:
            pipe.segment(image(), resolution=64, dtype=torch.float16)
        except (RuntimeError, FloatingPointError):
            pass  # fp16 kernels may be missing on CPU; the warning is what is tested


def test_segment_tta_averages_six_views(pipe, monkeypatch):
    sizes = []
    original = pipe._one_view

    def counting(view, mask_only, generator):
        sizes.append(view.shape[-1])
        return original(view, mask_only, generator)

    monkeypatch.setattr(pipe, "_one_view", counting)
    out = pipe.segment(image(), resolution=256, tta=True, mask_only=True)
    assert sorted(sizes) == [192, 192, 256, 256, 320, 320]
    assert out.masks[0].shape == (70, 90) and torch.isfinite(out.masks[0]).all()


def test_segment_tta_maps_are_flipped_back_resized_and_averaged(pipe, monkeypatch):
    """Each view's "map" is the view itself (its first channel, weighted by its scale so that
    the views differ): the TTA result must then be the one-view result times the mean weight.
    A view not flipped back, a view left out or a wrong resize shows against the ramp."""
    def view_as_map(view, mask_only, generator):
        return (view[:, :1] + 1) * (view.shape[-1] / 256) ** 2

    monkeypatch.setattr(pipe, "_one_view", view_as_map)
    ramp = np.broadcast_to(np.linspace(0, 255, 90)[None, :, None], (70, 90, 3)).astype(np.uint8)  # dark left
    one = pipe.segment(ramp, resolution=256, mask_only=True).masks[0]
    tta = pipe.segment(ramp, resolution=256, tta=True, mask_only=True).masks[0]
    mean_weight = sum((size / 256) ** 2 for size in (192, 256, 320)) / 3
    assert one[:, -1].mean() > one[:, 0].mean() + 1.5  # the ramp survives, left to right
    torch.testing.assert_close(tta, one * mean_weight, atol=2e-3, rtol=1e-3)  # measured 4.7e-4; a half-pixel shift is 1e-2


def test_segment_accepts_pil_tensors_and_arrays(pipe):
    from PIL import Image

    array = image()
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    reference = pipe.segment(array, resolution=64, generator=g()).masks[0]
    for same in (Image.fromarray(array), tensor, tensor.float() / 255, tensor[None], array[None]):
        torch.testing.assert_close(pipe.segment(same, resolution=64, generator=g()).masks[0], reference)
    gray = pipe.segment(Image.fromarray(array).convert("L"), resolution=64).masks[0]  # converted to RGB
    assert gray.shape == (70, 90)


def test_images_in_the_forms_users_hold_them():
    """Found by a new-user trial: a BGR -> RGB flip (negative strides) raised torch's raw error, a
    read-only array (np.asarray of a PIL image) warned, and a 16-bit PIL image was clipped to 1.0
    by PIL's convert("RGB")."""
    from PIL import Image

    from mmfast.models.diffdis.pipeline import as_rgb_images

    bgr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(as_rgb_images(bgr[..., ::-1])[0], expected, rtol=0, atol=0)
    read_only = np.asarray(Image.fromarray(bgr))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert as_rgb_images(read_only)[0].shape == (3, 20, 30)
    ramp = np.linspace(0, 65535, 600).reshape(20, 30).astype(np.uint16)
    sixteen = as_rgb_images(Image.fromarray(ramp))[0]
    assert Image.fromarray(ramp).mode == "I;16" and sixteen.shape == (3, 20, 30)
    torch.testing.assert_close(sixteen[1], torch.from_numpy(ramp.astype(np.float32) / 65535), rtol=0, atol=0)
    torch.testing.assert_close(as_rgb_images(np.stack([ramp] * 3, -1))[0], sixteen)  # uint16 arrays alike
    with pytest.raises(ValueError, match="mode F .* no fixed range"):
        as_rgb_images(Image.fromarray(ramp.astype(np.float32)))
    # the shape and dtype as given (a new-user trial saw an RGBA array named (4, 64, 80))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) or \(B, H, W, 3\) RGB, got shape \(64, 80, 4\)"):
        as_rgb_images(np.zeros((64, 80, 4), np.uint8))
    with pytest.raises(ValueError, match=r"numpy images must be uint8 .*got int32$"):  # numpy's name, not torch's
        as_rgb_images(np.zeros((64, 80, 3), np.int32))
    with pytest.raises(ValueError, match=r"image tensors must be uint8 .*got torch.int32$"):
        as_rgb_images(torch.zeros(3, 64, 80, dtype=torch.int32))


def test_segment_rejects_bad_input(pipe):
    with pytest.raises(ValueError, match="3 channels"):
        pipe.segment(torch.rand(1, 32, 32), resolution=64)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) or \(B, H, W, 3\) RGB, got shape \(32, 32, 4\)"):
        pipe.segment(np.zeros((32, 32, 4), np.uint8), resolution=64)
    with pytest.raises(ValueError, match=r"uint8 \(0..255\), uint16 \(0..65535\) or floating point"):
        pipe.segment(torch.zeros(3, 32, 32, dtype=torch.int64), resolution=64)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        pipe.segment(torch.full((3, 32, 32), 2.0), resolution=64)
    for empty in (torch.zeros(3, 0, 32), np.zeros((32, 0, 3), np.uint8)):
        with pytest.raises(ValueError, match="at least 1 x 1 pixels"):
            pipe.segment(empty, resolution=64)
    with pytest.raises(ValueError, match="multiple of 64"):
        pipe.segment(image(), resolution=100)
    with pytest.raises(ValueError, match="multiple of 64"):
        pipe.segment(image(), resolution=64.0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 1.5"):
        pipe.segment(image(), resolution=64, batch_size=1.5)
    with pytest.raises(ValueError, match="needs one per image of a batch, batch_size = 1, got 2"):
        pipe.segment(image(), resolution=64, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert pipe.segment(image(), resolution=np.int64(64), batch_size=np.int64(1)).masks[0].shape  # numpy ints pass
    with pytest.raises(TypeError, match="PIL images, numpy arrays or torch tensors"):
        pipe.segment("image.png")


# --- checkpoints ----------------------------------------------------------------------------


def test_checkpoint_round_trip_in_the_released_layout(tmp_path):
    unet = save_tiny_diffdis_checkpoint(str(tmp_path))
    loaded = DiffDISPipeline.from_pretrained(str(tmp_path))
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[key], value, rtol=0, atol=0)
    embedding = encode_empty_prompt(str(tmp_path))
    assert embedding.shape == (1, 2, 32)  # "" -> BOS, EOS (unpadded)
    torch.testing.assert_close(loaded.empty_text_embedding, embedding)
    out = loaded.segment(image(), resolution=64)
    assert torch.isfinite(out.masks[0]).all()
    # The saved embedding replaces the text encoder.
    path = str(tmp_path / "empty.safetensors")
    loaded.save_empty_text_embedding(path)
    again = DiffDISPipeline.from_pretrained(str(tmp_path), empty_text_embedding=path)
    torch.testing.assert_close(again.empty_text_embedding, embedding)


@pytest.mark.parametrize("folder", ["vae", "scheduler", "tokenizer"])
def test_a_missing_folder_is_named_and_never_fetched(tmp_path, monkeypatch, folder):
    """A relative directory without vae/ (or tokenizer/) must not become a Hub repo id: diffusers
    and transformers would try to download it (found by a new-user trial)."""
    save_tiny_diffdis_checkpoint(str(tmp_path / "ckpt"))
    shutil.rmtree(tmp_path / "ckpt" / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(FileNotFoundError, match=f"ckpt/{folder}' is not a directory"):
        DiffDISPipeline.from_pretrained("ckpt")


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        DiffDISPipeline.from_pretrained(str(tmp_path / "missing"))
    save_tiny_diffdis_checkpoint(str(tmp_path), text_encoder=False)
    with pytest.raises(FileNotFoundError, match="empty-prompt embedding"):
        DiffDISPipeline.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.safetensors' does not exist"):
        DiffDISPipeline.from_pretrained(str(tmp_path), empty_text_embedding=str(tmp_path / "missing.safetensors"))
    with pytest.raises(TypeError, match="torch_dtype must be a torch.dtype"):
        DiffDISPipeline.from_pretrained(str(tmp_path), torch_dtype="bfloat16")
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state[f"{MID}attn3.to_q.weight"]
    save_file(state, str(weights))
    with pytest.raises(RuntimeError, match="attn3.to_q.weight"):
        DiffDISUNet.from_pretrained(str(tmp_path / "unet"))
    # a stock SD-2.1-style UNet's weights where DiffDIS's belong: said in those terms, not as a key list
    from diffusers import UNet2DConditionModel
    from mmfast.testing.tiny_diffdis import tiny_unet_config

    save_file(UNet2DConditionModel.from_config(tiny_unet_config()).state_dict(), str(weights))
    with pytest.raises(ValueError, match="holds none of DiffDIS's added weights .* stock sd-turbo"):
        DiffDISUNet.from_pretrained(str(tmp_path / "unet"))
    # a wrapper's keys ("unet.conv_in.weight"): the prefix is named, not "none of DiffDIS's weights"
    save_file({f"unet.{key}": value for key, value in state.items()}, str(weights))
    with pytest.raises(ValueError, match="under the prefix 'unet.' \\(a wrapper's state dict\\)"):
        DiffDISUNet.from_pretrained(str(tmp_path / "unet"))
    # a malformed config names its file
    (tmp_path / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        DiffDISUNet.from_pretrained(str(tmp_path / "unet"))


def test_truncated_weights_name_their_file(tmp_path):
    """An interrupted download leaves a truncated file: safetensors' own error named no file, and
    diffusers' for the VAE read as a missing file (found by a new-user trial)."""
    save_tiny_diffdis_checkpoint(str(tmp_path))
    for folder, owner in (("unet", "DiffDISUNet"), ("vae", "DiffDISPipeline")):
        weights = tmp_path / folder / "diffusion_pytorch_model.safetensors"
        intact = weights.read_bytes()
        weights.write_bytes(intact[:100])
        with pytest.raises(ValueError, match=f"{owner}: .*{folder}/diffusion_pytorch_model.safetensors is not a "
                           "readable safetensors file .*fetch it again"):
            DiffDISPipeline.from_pretrained(str(tmp_path))
        weights.write_bytes(intact)


# --- linear attention -----------------------------------------------------------------------


def test_linear_attention_swaps_only_the_top_level(pipe):
    names = top_level_attn1_names(pipe.unet, levels=1)
    assert names and all(n.startswith(("down_blocks.0.", "up_blocks.3.")) for n in names)
    assert len(top_level_attn1_names(pipe.unet, levels=2)) > len(names)
    for levels in (0, 4):  # the range names the levels with self-attention (a new-user trial: it said [1, 4])
        with pytest.raises(ValueError, match=r"levels must be in \[1, 3\] \(the top levels with self-attention"):
            top_level_attn1_names(pipe.unet, levels=levels)
    with pytest.raises(TypeError, match="levels must be an int, got 2.0"):
        top_level_attn1_names(pipe.unet, levels=2.0)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    softmax = pipe.segment(image(), resolution=RESOLUTION, generator=g()).masks[0]
    with pytest.warns(UserWarning, match="not distilled"):
        linfusion = pipe.enable_linear_attention(levels=1)
    try:
        from mmfast.models.linfusion import GeneralizedLinearAttention

        swapped = [n for n, m in pipe.unet.named_modules() if isinstance(m, GeneralizedLinearAttention)]
        assert sorted(swapped) == sorted(names)
        linear = pipe.segment(image(), resolution=RESOLUTION, generator=g()).masks[0]
        assert torch.isfinite(linear).all() and (linear - softmax).abs().max() > 0
    finally:
        pipe.disable_linear_attention()
    torch.testing.assert_close(pipe.segment(image(), resolution=RESOLUTION, generator=g()).masks[0], softmax)
    assert linfusion.partial


def test_prepare_unet_inputs_refuses_what_is_not_its_batch():
    """Found by a new-user trial: [0, 255] values, a size not a multiple of 64, uint8 tensors and
    lists went in silently or failed deep inside the VAE."""
    from mmfast.models.diffdis import as_rgb_images, resize_input

    pipe = tiny_diffdis_pipeline()
    for images, error, match in ((torch.rand(1, 3, 128, 128) * 255, ValueError, r"in \[-1, 1\].*got values in \[0"),
                                 (torch.rand(1, 3, 100, 100), ValueError, r"R a positive multiple of 64, got shape "
                                                                          r"\(1, 3, 100, 100\)"),
                                 (torch.rand(1, 3, 64, 128), ValueError, "got shape"),
                                 (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "got torch.uint8"),
                                 ([torch.rand(3, 64, 64)], TypeError, "got list; torch.cat\(\[resize_input")):
        with pytest.raises(error, match=match):
            pipe.prepare_unet_inputs(images)
    batch = torch.cat([resize_input(image, 64) for image in as_rgb_images(torch.rand(2, 3, 50, 70))])
    assert pipe.prepare_unet_inputs(batch).sample.shape == (4, 8, 8, 8)


def test_linear_attention_distillation_step_and_reload(tmp_path):
    pipe = tiny_diffdis_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        linfusion = pipe.enable_linear_attention(levels=1)
    distiller = LinFusionDistiller(pipe.unet, linfusion)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    inputs = pipe.prepare_unet_inputs(images, torch.Generator().manual_seed(0))
    assert not inputs.sample.requires_grad and not any(t.requires_grad for t in inputs.rgb_latents)
    # x_T is pure noise at inference, not noise added to known latents: no denoising target, the
    # student learns the teacher's prediction and attn1 outputs (the noise as target would pull
    # x0 towards a third of the teacher's).
    loss, parts = distiller(inputs.sample, inputs.timestep, inputs.encoder_hidden_states, None,
                            rgb_latents=inputs.rgb_latents)
    loss.backward()
    assert torch.isfinite(loss) and parts["denoise"] is None and parts["teacher"] > 0
    torch.testing.assert_close(loss.detach(), 0.5 * parts["teacher"] + 0.5 * parts["feature"])
    assert all(p.grad is not None for p in linfusion.parameters())
    student = {id(p) for p in linfusion.parameters()}
    assert all(p.grad is None for p in pipe.unet.parameters() if id(p) not in student)  # the UNet stays frozen
    assert all(p.grad is None for p in pipe.vae.parameters())  # and so does the VAE
    loss, _ = distiller(inputs.sample, inputs.timestep, inputs.encoder_hidden_states, None,
                        rgb_latents=inputs.rgb_latents)
    loss.backward()  # the same inputs again (no graph through the VAE to free twice)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    expected = pipe.segment(image(), resolution=64, generator=g()).masks[0]
    linfusion.save_pretrained(str(tmp_path / "linear"))
    pipe.disable_linear_attention()
    pipe.enable_linear_attention(levels=1, pretrained=str(tmp_path / "linear"))
    torch.testing.assert_close(pipe.segment(image(), resolution=64, generator=g()).masks[0], expected)
    pipe.disable_linear_attention()
    with pytest.raises(ValueError, match="levels=2 needs"):
        pipe.enable_linear_attention(levels=2, pretrained=str(tmp_path / "linear"))
