"""Tiled VAE encode/decode (mmfast.models.vae_tiling) on tiny random diffusers AutoencoderKLs:
"exact" equals the untiled pass, "blend" is off by a measured, bounded amount, diffusers'
attributes survive, bad inputs and unknown structures are refused."""
from __future__ import annotations

import copy
import io
import re

import pytest
import numpy as np
import torch
from torch import nn

from mmfast.models.vae_tiling import VAE_TILING_MODES, decode_latents, encode_images, tiling_error

# "exact" vs untiled, fp32. Both compute the same sums, but in different orders: GroupNorm
# statistics are summed band by band, and convolutions over a band choose their own blocking.
# That is ~1 ulp (1.2e-7 relative) per layer, grown through ~20 layers to a measured <= 1.8e-6 on
# outputs of magnitude ~2. A real seam (a missing halo row, per-band statistics) is ~1e-1 here.
EXACT = dict(rtol=1e-4, atol=1e-5)


def tiny_vae(levels: int = 2, layers_per_block: int = 1, seed: int = 0, **config):
    """Like mmfast.testing.tiny_diffusers.tiny_pipeline's VAE; levels 2 is 2x, levels 3 is 4x."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(16, 32, 32)[:levels],
        layers_per_block=layers_per_block, latent_channels=4, norm_num_groups=8, sample_size=32, **config,
    ).eval()


@pytest.fixture(scope="module")
def vae2():
    return tiny_vae()


@pytest.fixture(scope="module")
def vae3():
    return tiny_vae(levels=3, layers_per_block=2, seed=1)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- "exact" equals the untiled pass ---------------------------------------------------------


@pytest.mark.parametrize("tile", [1, 5, 12, 100])  # 5 does not divide 12 rows; 100 > the height
def test_exact_decode_equals_untiled(vae2, tile):
    latents = randn(2, 4, 12, 10)
    reference = decode_latents(vae2, latents)
    out = decode_latents(vae2, latents, mode="exact", tile_size=tile, offload_device="cpu")
    assert out.shape == (2, 3, 24, 20) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference, **EXACT)


@pytest.mark.parametrize("tile", [2, 4])  # 4 does not divide 9 rows
def test_exact_decode_equals_untiled_three_levels(vae3, tile):
    latents = randn(1, 4, 9, 7, seed=1)
    reference = decode_latents(vae3, latents)
    out = decode_latents(vae3, latents, mode="exact", tile_size=tile)
    assert out.shape == (1, 3, 36, 28)
    torch.testing.assert_close(out, reference, **EXACT)


@pytest.mark.parametrize("levels,shape,tile", [
    (2, (2, 3, 24, 20), 2), (2, (2, 3, 24, 20), 10), (2, (2, 3, 24, 20), 200),
    (3, (1, 3, 36, 28), 4), (3, (1, 3, 36, 28), 16),
])
def test_exact_encode_equals_untiled(vae2, vae3, levels, shape, tile):
    vae = vae2 if levels == 2 else vae3
    x = images(*shape)
    reference = encode_images(vae, x, sample=False)
    out = encode_images(vae, x, mode="exact", tile_size=tile, sample=False, offload_device="cpu")
    factor = 2 ** (levels - 1)
    assert out.shape == (shape[0], 4, shape[2] // factor, shape[3] // factor)
    torch.testing.assert_close(out, reference, **EXACT)


def test_exact_bands_shrink_under_the_element_limit_and_stay_exact(vae3, monkeypatch):
    """Bands are cut to keep every tensor under 2^31 elements; here a limit of 3000 elements cuts
    them to 1-2 rows (strided downsampling and upsampling included), and the result is unchanged."""
    from mmfast.models import vae_tiling

    latents, x = randn(1, 4, 9, 7, seed=1), images(1, 3, 36, 28)
    decoded, encoded = decode_latents(vae3, latents), encode_images(vae3, x, sample=False)
    seen = []
    conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(vae_tiling, "_INDEX_LIMIT", 3000)
    monkeypatch.setattr(vae_tiling.F, "conv2d", lambda t, *a: seen.append(t.numel()) or conv2d(t, *a))
    torch.testing.assert_close(decode_latents(vae3, latents, mode="exact", tile_size=100), decoded, **EXACT)
    torch.testing.assert_close(encode_images(vae3, x, mode="exact", tile_size=100, sample=False), encoded, **EXACT)
    assert max(seen) <= 3000 and len(seen) > 500
    sink = io.StringIO()  # the bar names the bands the cap made, not the nominal single band
    decode_latents(vae3, latents, mode="exact", tile_size=100, progress={"file": sink})
    shown = sink.getvalue()
    assert "VAE decode (1 band)" in shown and re.search(r"VAE decode \(up to (\d+) bands\)", shown)
    assert int(re.search(r"up to (\d+) bands", shown.split("\r")[-1]).group(1)) >= 9


def test_exact_attention_runs_one_sample_at_a_time_past_the_limit(vae3, monkeypatch):
    """A batch whose mid-block keys pass the element limit attends one sample at a time (2 x 120
    tokens x 32 channels = 7680 > 6000 here), with the same result."""
    from mmfast.models import vae_tiling

    latents = randn(2, 4, 12, 10, seed=2)
    decoded = decode_latents(vae3, latents)
    batches = []
    sdpa = vae_tiling.F.scaled_dot_product_attention
    monkeypatch.setattr(vae_tiling, "_INDEX_LIMIT", 6000)
    monkeypatch.setattr(vae_tiling.F, "scaled_dot_product_attention",
                        lambda q, k, v: batches.append(k.shape[0]) or sdpa(q, k, v))
    torch.testing.assert_close(decode_latents(vae3, latents, mode="exact", tile_size=100), decoded, **EXACT)
    assert batches and set(batches) == {1}


@pytest.mark.parametrize("latent_shape", [(1, 4, 1024, 2048), (2, 4, 1024, 2048)])
def test_exact_decode_of_a_16k_wide_image_stays_under_2_31_elements(monkeypatch, latent_shape):
    """SD's VAE decoder (256 channels at full resolution) on a 16384-px-wide image, traced on the
    meta device: the scaled bands of 512 rows made 2^31+-element conv and interpolate tensors,
    past which torch / cuDNN kernels take 32-bit-unsafe or im2col fallbacks; the mid-block
    attention's keys of a batch of 2 reached 2^31 (one sample at a time now)."""
    from diffusers import AutoencoderKL

    from mmfast.models import vae_tiling

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
    largest = {}

    def watch(name, fn):
        def call(t, *args, **kwargs):
            out = fn(t, *args, **kwargs)
            largest[name] = max(largest.get(name, 0), t.numel(), out.numel())
            return out
        return call

    for name in ("conv2d", "interpolate", "scaled_dot_product_attention"):
        monkeypatch.setattr(vae_tiling.F, name, watch(name, getattr(vae_tiling.F, name)))
    sdpa = vae_tiling.F.scaled_dot_product_attention
    monkeypatch.setattr(vae_tiling.F, "scaled_dot_product_attention",  # the keys too, not only the queries
                        lambda q, k, v: largest.__setitem__("keys", max(largest.get("keys", 0), k.numel())) or sdpa(q, k, v))
    out = decode_latents(vae, torch.empty(*latent_shape, device="meta"), mode="exact")
    assert out.shape == (latent_shape[0], 3, 8192, 16384)
    assert max(largest.values()) < 2**31, largest


def test_exact_encode_samples_with_the_generator(vae2):
    x = images(1, 3, 16, 12)
    reference = encode_images(vae2, x, generator=torch.Generator().manual_seed(3))
    out = encode_images(vae2, x, mode="exact", tile_size=4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, reference, **EXACT)
    assert not torch.allclose(out, encode_images(vae2, x, mode="exact", tile_size=4, sample=False))


def test_scaling_and_shift_factor_as_diffusers_pipelines():
    vae = tiny_vae(scaling_factor=0.5, shift_factor=0.1)
    latents, x = randn(1, 4, 6, 6), images(1, 3, 12, 12)
    with torch.no_grad():
        decoded = vae.decode(latents / 0.5 + 0.1).sample
        encoded = (vae.encode(x).latent_dist.mode() - 0.1) * 0.5
    for mode, tile in (("none", None), ("exact", 2)):
        torch.testing.assert_close(decode_latents(vae, latents, mode=mode, tile_size=tile), decoded, **EXACT)
        torch.testing.assert_close(encode_images(vae, x, mode=mode, tile_size=tile and 4, sample=False),
                                   encoded, **EXACT)


def test_exact_keeps_the_vae_dtype(vae2):
    vae = copy.deepcopy(vae2).to(torch.bfloat16)
    latents = randn(1, 4, 8, 6)  # fp32 latents are cast to the VAE's dtype, as the output
    out = decode_latents(vae, latents, mode="exact", tile_size=3)
    assert out.dtype == torch.bfloat16
    # bf16's tolerance (measured: equal); a seam between bands is about 1e-1
    torch.testing.assert_close(out, decode_latents(vae, latents), rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.cuda
def test_exact_decode_on_gpu_with_cpu_offload(vae2):
    vae = copy.deepcopy(vae2).cuda()
    latents = randn(2, 4, 12, 10).cuda()
    out = decode_latents(vae, latents, mode="exact", tile_size=5, offload_device="cpu")
    assert out.device == latents.device
    torch.testing.assert_close(out, decode_latents(vae, latents), rtol=1e-3, atol=1e-3)  # TF32 convs


# --- "blend": diffusers' tiles, a bounded approximation -------------------------------------


def test_blend_decode_error_is_measured_and_bounded(vae2):
    latents = randn(1, 4, 24, 24)  # 3x3 tiles of 16 latent px, overlap 4
    reference = decode_latents(vae2, latents)
    blend = tiling_error(reference, decode_latents(vae2, latents, mode="blend", tile_size=16, tile_overlap=4))
    exact = tiling_error(reference, decode_latents(vae2, latents, mode="exact", tile_size=16))
    # Measured on this seeded random VAE: max 0.37, mean 0.034, 32.8 dB. Per-tile GroupNorm
    # statistics and tile-local attention really change the image...
    assert 1e-2 < blend["max_abs"] < 0.5 and blend["mean_abs"] < 0.05 and 28 < blend["psnr_db"] < 60
    # ...which banded "exact" does not (measured max 8.4e-7, 140 dB).
    assert exact["max_abs"] < 1e-5 and exact["psnr_db"] > 100


def test_blend_encode_error_is_bounded(vae2):
    x = images(1, 3, 48, 48)
    reference = encode_images(vae2, x, sample=False)
    out = encode_images(vae2, x, mode="blend", tile_size=32, tile_overlap=8, sample=False)
    assert out.shape == reference.shape
    error = tiling_error(reference, out)  # measured: max 0.064, mean 0.0057, 47.3 dB
    assert 1e-3 < error["max_abs"] < 0.1 and error["psnr_db"] > 40


def test_blend_overlap_is_exact_arithmetic(vae2):
    # overlap 4 of tile 5: diffusers' int(5 * (1 - 0.8)) is 0 with a float factor (step 0).
    latents = randn(1, 4, 12, 10)
    out = decode_latents(vae2, latents, mode="blend", tile_size=5, tile_overlap=4)
    assert out.shape == (1, 3, 24, 20) and torch.isfinite(out).all()


def test_blend_restores_the_vae_attributes(vae2, monkeypatch):
    names = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")
    before = {name: getattr(vae2, name) for name in names}
    decode_latents(vae2, randn(1, 4, 12, 10), mode="blend", tile_size=8, tile_overlap=2)
    encode_images(vae2, images(1, 3, 24, 20), mode="blend", tile_size=16, tile_overlap=4)
    assert {name: getattr(vae2, name) for name in names} == before

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(vae2.decoder, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        decode_latents(vae2, randn(1, 4, 12, 10), mode="blend", tile_size=8)
    assert {name: getattr(vae2, name) for name in names} == before


def test_none_is_untiled_even_when_the_vae_has_tiling_on(vae2, monkeypatch):
    latents = randn(1, 4, 12, 10)
    reference = decode_latents(vae2, latents)
    monkeypatch.setattr(vae2, "use_tiling", True)
    monkeypatch.setattr(vae2, "tile_latent_min_size", 4)
    monkeypatch.setattr(vae2, "tile_sample_min_size", 8)
    torch.testing.assert_close(decode_latents(vae2, latents), reference, rtol=0, atol=0)
    assert vae2.use_tiling is True


# --- errors ----------------------------------------------------------------------------------


def test_tiling_error_values():
    a = torch.zeros(1, 3, 2, 2)
    assert tiling_error(a, a) == {"max_abs": 0.0, "mean_abs": 0.0, "psnr_db": float("inf")}
    b = a.clone()
    b[0, 0, 0, 0] = 0.2  # mse 0.04 / 12; PSNR on the peak-to-peak range 2
    error = tiling_error(a, b)
    assert error["max_abs"] == pytest.approx(0.2) and error["mean_abs"] == pytest.approx(0.2 / 12)
    assert error["psnr_db"] == pytest.approx(10 * torch.log10(torch.tensor(4 * 12 / 0.04)).item())
    with pytest.raises(ValueError, match="shapes differ"):
        tiling_error(a, torch.zeros(1, 3, 2, 3))


BAD_DECODE = [
    (dict(latents=randn(4, 8, 8)), r"\(B, 4, H, W\)"),
    (dict(latents=randn(1, 3, 8, 8)), r"\(B, 4, H, W\)"),
    (dict(mode="tiled"), "mode must be one of"),
    (dict(mode="exact", tile_size=0), "tile_size must be an int >= 1"),
    (dict(mode="blend", tile_size=8, tile_overlap=8), "0 <= overlap < tile_size=8"),
    (dict(tile_size=8), "need mode 'blend' or 'exact'"),
    (dict(mode="exact", tile_overlap=2), "'blend' only"),
    (dict(mode="blend", offload_device="cpu"), "'exact' only"),
    (dict(mode="exact", tile_size=8.0), "tile_size must be an int >= 1"),
    (dict(mode="blend", tile_size=8, tile_overlap=True), "tile_overlap must be an int"),
]


@pytest.mark.parametrize("kwargs,match", BAD_DECODE)
def test_decode_rejects_bad_inputs(vae2, kwargs, match):
    kwargs = {"latents": randn(1, 4, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=match):
        decode_latents(vae2, **kwargs)


BAD_ENCODE = [
    (dict(images=images(1, 4, 8, 8)), r"\(B, 3, H, W\)"),
    (dict(images=images(1, 3, 9, 8)), "multiples of 2"),
    (dict(mode="exact", tile_size=5), "tile_size must be a multiple of 2"),
    (dict(mode="blend", tile_size=8, tile_overlap=3), "tile_overlap must be a multiple of 2"),
    (dict(sample="yes"), "sample must be a bool"),
]


@pytest.mark.parametrize("kwargs,match", BAD_ENCODE)
def test_encode_rejects_bad_inputs(vae2, kwargs, match):
    kwargs = {"images": images(1, 3, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=match):
        encode_images(vae2, **kwargs)


def test_numpy_tile_sizes_are_taken_as_ints(vae2):
    """numpy integers (MemoryOptions takes them) were refused here as "not an int"."""
    latents, pixels = randn(1, 4, 8, 8), images(1, 3, 16, 16)
    for mode, overlap in (("blend", np.int64(2)), ("exact", None)):
        torch.testing.assert_close(decode_latents(vae2, latents, mode=mode, tile_size=np.int32(4), tile_overlap=overlap),
                                   decode_latents(vae2, latents, mode=mode, tile_size=4,
                                                  tile_overlap=None if overlap is None else 2), rtol=0, atol=0)
        encode_images(vae2, pixels, mode=mode, tile_size=np.int64(8), tile_overlap=None if overlap is None else 2 * overlap)


def test_exact_mode_shows_progress_over_the_layers(vae2, capsys):
    latents, pixels = randn(1, 4, 8, 8), images(1, 3, 16, 16)
    quiet = decode_latents(vae2, latents, mode="exact", tile_size=4)
    assert capsys.readouterr().err == ""
    shown = decode_latents(vae2, latents, mode="exact", tile_size=4, progress=True)
    assert "VAE decode (2 bands)" in capsys.readouterr().err
    torch.testing.assert_close(shown, quiet, rtol=0, atol=0)
    encode_images(vae2, pixels, mode="exact", tile_size=8, progress=True)
    assert "VAE encode (2 bands)" in capsys.readouterr().err
    import io

    sink = io.StringIO()
    decode_latents(vae2, latents, mode="exact", tile_size=4, progress={"file": sink, "ncols": 60})
    assert "VAE decode (2 bands)" in sink.getvalue() and capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="progress must be a bool or a dict"):
        decode_latents(vae2, latents, mode="exact", progress="yes")


def test_rejects_other_models():
    with pytest.raises(TypeError, match="AutoencoderKL"):
        decode_latents(nn.Conv2d(4, 3, 1), randn(1, 4, 8, 8))


def test_exact_refuses_a_vae_on_another_device(vae2):
    vae = copy.deepcopy(vae2).to("meta")  # like accelerate's sequential offload
    with pytest.raises(ValueError, match="move the VAE"):
        decode_latents(vae, randn(1, 4, 8, 8), mode="exact")


def _spatial_norm_decoder(vae):
    from diffusers.models.attention_processor import SpatialNorm
    vae.decoder.conv_norm_out = SpatialNorm(32, 4)


def _unknown_up_block(vae):
    vae.decoder.up_blocks[0] = nn.Identity()


def _custom_attention_processor(vae):
    from diffusers.models.attention_processor import SlicedAttnProcessor
    vae.decoder.mid_block.attentions[0].set_processor(SlicedAttnProcessor(2))


def _lora_like_conv(vae):
    vae.decoder.up_blocks[1].resnets[0].conv2 = nn.Sequential(vae.decoder.up_blocks[1].resnets[0].conv2)


@pytest.mark.parametrize("edit,match", [
    (_spatial_norm_decoder, r"vae\.decoder\.conv_norm_out \(SpatialNorm\).*spatial-norm"),
    (_unknown_up_block, r"vae\.decoder\.up_blocks\.0 \(Identity\).*UpDecoderBlock2D"),
    (_custom_attention_processor, r"vae\.decoder\.mid_block\.attentions\.0 .*SlicedAttnProcessor"),
    (_lora_like_conv, r"vae\.decoder\.up_blocks\.1\.resnets\.0\.conv2 \(Sequential\)"),
])
def test_exact_names_an_unsupported_module(vae2, edit, match):
    vae = copy.deepcopy(vae2)
    edit(vae)
    with pytest.raises(NotImplementedError, match=match):
        decode_latents(vae, randn(1, 4, 8, 8), mode="exact")


def test_exact_names_an_unsupported_encoder_block(vae2):
    from diffusers.models.unets.unet_2d_blocks import DownBlock2D
    vae = copy.deepcopy(vae2)
    vae.encoder.down_blocks[1] = DownBlock2D(in_channels=32, out_channels=32, temb_channels=None,
                                             add_downsample=False, resnet_groups=8)
    with pytest.raises(NotImplementedError, match=r"vae\.encoder\.down_blocks\.1 \(DownBlock2D\)"):
        encode_images(vae, images(1, 3, 8, 8), mode="exact")


def test_modes():
    assert VAE_TILING_MODES == ("none", "blend", "exact")


def test_exact_decode_in_fp64_is_exact_to_fp64():
    """The exact mode's GroupNorm statistics were fp32 even for an fp64 VAE (1.8e-7 off untiled);
    fp64 stays fp64: within 1e-12."""
    vae = tiny_vae().double()
    latents = randn(1, 4, 12, 10).double()
    out = decode_latents(vae, latents, mode="exact", tile_size=5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, decode_latents(vae, latents), rtol=0, atol=1e-12)
