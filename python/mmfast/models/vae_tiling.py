"""Tiled encode/decode for a diffusers AutoencoderKL, for images larger than an untiled pass fits.

LinFusion generates up to 16384x8192 px; decoding that in one VAE call needs far more memory
than a GPU has. Three modes:

- "none":  the plain untiled VAE call (diffusers' own tiling switched off for the call).
- "blend": diffusers' own overlapping-tile code (`tiled_decode` / `_tiled_encode`), tiles
  blended linearly across the overlap. Each tile normalizes with its OWN GroupNorm statistics
  and its mid-block attention sees only the tile, so the result only approximates the untiled
  one (measure it with `tiling_error`). The working memory is one tile's; diffusers keeps every
  tile's output until the blend (about 1.8x the output at the default overlap), then the result.
- "exact": the untiled computation, layer by layer over horizontal bands of rows. 3x3 convs
  read halo rows of the neighbouring bands, GroupNorm uses statistics over the whole image
  (fp32 sums, centred second pass for the variance), nearest 2x upsampling and stride-2
  downsampling map bands onto bands, and the mid-block softmax attention runs queries band by
  band against all keys/values. Equal to "none" up to floating-point rounding. Each layer's
  full-size activation is held on `offload_device` (e.g. "cpu"); only a band (plus the
  mid-block keys/values) is on the compute device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
from fractions import Fraction
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._dtypes import accumulation_dtype
from ..ops._checks import is_integer

VAE_TILING_MODES = ("none", "blend", "exact")

# diffusers' tiles follow the VAE config's sample_size (512 px for SD-1.5 / 2.1's VAE, 1024 for
# SD-XL's); mmfast's defaults are fixed: 512 image px, 64 latent px (512 px at 8x).
_DEFAULT_DECODE_TILE = 64  # latent px
_DEFAULT_ENCODE_TILE = 512  # image px
_ELEMENTWISE_ACTIVATIONS = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU)  # what diffusers' get_activation returns


# --- public API --------------------------------------------------------------------------


def decode_latents(vae, latents: torch.Tensor, *, mode: str = "none", tile_size: int | None = None,
                   tile_overlap: int | None = None, offload_device=None, progress: bool = False) -> torch.Tensor:
    """Decodes pipeline-scaled latents into an image, optionally tiled.

    Args:
        vae: a diffusers `AutoencoderKL`.
        latents: (B, latent_channels, h, w), scaled as diffusers pipelines hold them; this divides
            by `vae.config.scaling_factor` and adds `vae.config.shift_factor` (when not None), or
            with SD-XL-style `latents_mean`/`latents_std` in the config, undoes those as diffusers does.
            Cast to the VAE's dtype; computed on the latents' device (the VAE must be there).
        mode: one of VAE_TILING_MODES (see the module docstring).
        tile_size: in LATENT pixels. "blend": square tile side (default 64 = 512 image px at 8x).
            "exact": latent rows per band (default 64); bands at the higher resolutions cover
            the same image region. Not allowed with "none".
        tile_overlap: in latent pixels, "blend" only; 0 <= overlap < tile_size (default tile_size // 4).
        offload_device: "exact" only: where full-size activations live (default: the latents'
            device). Pass "cpu" on a GPU to keep only one band of each layer on the GPU.
        progress: a tqdm bar over the VAE's layers in "exact" mode, each run band by band (a
            2048 px decode takes minutes on a CPU); a dict gives tqdm's settings (e.g. a
            pipeline's set_progress_bar_config ones: file, ncols, position). The other modes
            run as one diffusers call.

    Returns:
        (B, out_channels, f*h, f*w) image in the VAE's [-1, 1] output range (not clamped), in the
        VAE's dtype, on the latents' device; f = 2 ** (len(block_out_channels) - 1). Forward only
        in "exact" mode (no autograd graph).

    Raises:
        TypeError: vae is not an AutoencoderKL.
        ValueError: bad latents (rank, channels), unknown mode, bad or misplaced tile options,
            VAE parameters not on the latents' device ("exact").
        NotImplementedError: "exact" on a decoder structure it does not know (names the module).
    """
    _check_vae(vae, "decode_latents")
    tile_size, tile_overlap = _check_mode(mode, tile_size, tile_overlap, offload_device, "decode_latents")
    _check_tensor(latents, "latents", vae.config.latent_channels, "decode_latents")
    factor = _downscale_factor(vae)
    z = _unscale(vae, latents.to(vae.dtype))
    if mode == "none":
        with _diffusers_tiling(vae, enabled=False):
            return vae.decode(z).sample
    tile = _DEFAULT_DECODE_TILE if tile_size is None else tile_size
    if mode == "blend":
        overlap = default_overlap(tile, 1) if tile_overlap is None else tile_overlap
        _check_overlap(tile, overlap, 1, "decode_latents")
        with _diffusers_tiling(vae, enabled=True, sample_tile=tile * factor, latent_tile=tile,
                               overlap=Fraction(overlap, tile)):
            return vae.decode(z).sample
    return _exact(vae, _decoder_steps(vae), z, tile, z.shape[2], offload_device, _bar(progress, "VAE decode"))


def encode_images(vae, images: torch.Tensor, *, mode: str = "none", tile_size: int | None = None,
                  tile_overlap: int | None = None, generator: torch.Generator | None = None,
                  sample: bool = True, offload_device=None, progress: bool = False) -> torch.Tensor:
    """Encodes images into pipeline-scaled latents, optionally tiled.

    Args:
        vae: a diffusers `AutoencoderKL`.
        images: (B, in_channels, H, W) in [-1, 1]; H and W multiples of f = 2 ** (levels - 1).
            Cast to the VAE's dtype; computed on the images' device (the VAE must be there).
        mode: one of VAE_TILING_MODES (see the module docstring).
        tile_size: in IMAGE pixels, a multiple of f. "blend": square tile side (default 512).
            "exact": image rows per band (default 512). Not allowed with "none".
        tile_overlap: in image pixels, "blend" only; a multiple of f, 0 <= overlap < tile_size
            (default: tile_size // 4 rounded down to a multiple of f).
        generator: for sampling the latent distribution (sample=True).
        sample: draw from latent_dist with `generator`; False takes its mode (the mean).
        offload_device: "exact" only, as in `decode_latents`.
        progress: as in `decode_latents`.

    Returns:
        (B, latent_channels, H/f, W/f) latents: (z - shift_factor) * scaling_factor as diffusers
        pipelines prepare them (shift only when the config has a non-None one), in the VAE's
        dtype, on the images' device. Forward only in "exact" mode.

    Raises:
        TypeError: vae is not an AutoencoderKL.
        ValueError: bad images (rank, channels, H or W not a multiple of f), unknown mode, bad or
            misplaced tile options, VAE parameters not on the images' device ("exact").
        NotImplementedError: "exact" on an encoder structure it does not know (names the module).
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    _check_vae(vae, "encode_images")
    tile_size, tile_overlap = _check_mode(mode, tile_size, tile_overlap, offload_device, "encode_images")
    _check_tensor(images, "images", vae.config.in_channels, "encode_images")
    if not isinstance(sample, bool):
        raise ValueError(f"encode_images: sample must be a bool, got {sample!r}")
    factor = _downscale_factor(vae)
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(f"encode_images: image height and width must be multiples of {factor}, "
                         f"got {tuple(images.shape[2:])}")
    x = images.to(vae.dtype)
    tile = _DEFAULT_ENCODE_TILE if tile_size is None else tile_size
    if mode != "none" and tile % factor:
        raise ValueError(f"encode_images: tile_size must be a multiple of {factor} image px, got {tile}")
    if mode == "none":
        with _diffusers_tiling(vae, enabled=False):
            dist = vae.encode(x).latent_dist
    elif mode == "blend":
        overlap = default_overlap(tile, factor) if tile_overlap is None else tile_overlap
        _check_overlap(tile, overlap, factor, "encode_images")
        with _diffusers_tiling(vae, enabled=True, sample_tile=tile, latent_tile=tile // factor,
                               overlap=Fraction(overlap, tile)):
            dist = vae.encode(x).latent_dist
    else:
        dist = DiagonalGaussianDistribution(_exact(vae, _encoder_steps(vae), x, tile, x.shape[2], offload_device,
                                                        _bar(progress, "VAE encode")))
    return _scale(vae, dist.sample(generator) if sample else dist.mode())


def _latent_statistics(vae, z: torch.Tensor):
    """SD-XL-style per-channel latents_mean / latents_std from the config, or None."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean), 1, 1)
    return (torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape),
            torch.tensor(std, dtype=z.dtype, device=z.device).view(shape))


def _scale(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents to pipeline latents, as diffusers' pipelines do (SD, SD-XL, SD3/Flux shift)."""
    statistics = _latent_statistics(vae, z)
    if statistics is not None:
        return (z - statistics[0]) * vae.config.scaling_factor / statistics[1]
    shift = getattr(vae.config, "shift_factor", None)
    return ((z - shift) if shift is not None else z) * vae.config.scaling_factor


def _unscale(vae, latents: torch.Tensor) -> torch.Tensor:
    statistics = _latent_statistics(vae, latents)
    if statistics is not None:
        return latents * statistics[1] / vae.config.scaling_factor + statistics[0]
    shift = getattr(vae.config, "shift_factor", None)
    z = latents / vae.config.scaling_factor
    return z + shift if shift is not None else z


def default_tile_size(encode: bool) -> int:
    """The default tile: 512 image px to encode, 64 latent px to decode (diffusers' defaults for
    a VAE of sample_size 512, as SD-1.5 / 2.1's; not SD-XL's 1024)."""
    return _DEFAULT_ENCODE_TILE if encode else _DEFAULT_DECODE_TILE


def default_overlap(tile: int, multiple: int = 1) -> int:
    """The default "blend" overlap: a quarter of the tile, rounded down to a multiple of `multiple`."""
    return tile // 4 // multiple * multiple


def tiling_error(reference: torch.Tensor, tiled: torch.Tensor) -> dict:
    """How far a tiled image is from the untiled one: {"max_abs", "mean_abs", "psnr_db"} (floats).

    Computed in float64 on the raw (unclamped) outputs; PSNR takes the peak as 2.0, the width of
    the VAE's [-1, 1] range, and is inf for identical images. Raises ValueError on a shape mismatch.
    """
    if reference.shape != tiled.shape:
        raise ValueError(f"tiling_error: shapes differ, {tuple(reference.shape)} vs {tuple(tiled.shape)}")
    diff = (reference.detach().double() - tiled.detach().to(reference.device).double()).abs()
    mse = float((diff * diff).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(4.0 / mse)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "psnr_db": psnr}


# --- argument checks and diffusers' own tiling ---------------------------------------------


def _check_vae(vae, fn):
    from diffusers import AutoencoderKL

    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"{fn}: vae must be a diffusers AutoencoderKL, got {type(vae).__name__}")


def _check_mode(mode, tile_size, tile_overlap, offload_device, fn):
    """Checks the tiling arguments; returns tile_size and tile_overlap as Python ints (or None):
    numpy and other integers with __index__ are taken, bools and floats are not."""
    if mode not in VAE_TILING_MODES:
        raise ValueError(f"{fn}: mode must be one of {VAE_TILING_MODES}, got {mode!r}")
    if mode == "none" and (tile_size is not None or tile_overlap is not None):
        raise ValueError(f"{fn}: tile_size/tile_overlap need mode 'blend' or 'exact', got mode 'none'")
    if tile_size is not None and (not is_integer(tile_size) or tile_size < 1):
        raise ValueError(f"{fn}: tile_size must be an int >= 1, got {tile_size!r}")
    if tile_overlap is not None and not is_integer(tile_overlap):
        raise ValueError(f"{fn}: tile_overlap must be an int, got {tile_overlap!r}")
    if tile_overlap is not None and mode != "blend":
        raise ValueError(f"{fn}: tile_overlap applies to mode 'blend' only (bands in 'exact' do not overlap)")
    if offload_device is not None and mode != "exact":
        raise ValueError(f"{fn}: offload_device applies to mode 'exact' only, got mode {mode!r}")
    return tuple(None if value is None else operator.index(value) for value in (tile_size, tile_overlap))


def _check_overlap(tile, overlap, factor, fn):
    if not 0 <= overlap < tile:
        raise ValueError(f"{fn}: tile_overlap must be an int with 0 <= overlap < tile_size={tile}, got {overlap!r}")
    if overlap % factor:
        raise ValueError(f"{fn}: tile_overlap must be a multiple of {factor} image px, got {overlap}")


def _check_tensor(x, name, channels, fn):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: {name} must be a floating (B, {channels}, H, W) tensor, got {got}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: {name} is empty, shape {tuple(x.shape)}")


def _downscale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@contextlib.contextmanager
def _diffusers_tiling(vae, enabled, sample_tile=None, latent_tile=None, overlap=None):
    """Sets diffusers' tiling attributes for one call and restores them, also on error.

    The overlap factor is a Fraction: diffusers derives its tile step and blend width with
    int(size * factor), which a float factor rounds down wrongly for e.g. overlap 4 of tile 5.
    """
    names = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")
    saved = {name: getattr(vae, name) for name in names}
    try:
        vae.use_tiling = enabled
        if enabled:
            vae.tile_sample_min_size, vae.tile_latent_min_size = sample_tile, latent_tile
            vae.tile_overlap_factor = overlap
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


# --- "exact": the untiled computation over bands of rows --------------------------------------


_INDEX_LIMIT = 2**31 - 1  # elements of one tensor that every torch kernel indexes safely


@dataclasses.dataclass
class _Bands:
    """Where bands are computed (device), where full activations live (store), band height."""

    device: torch.device
    store: torch.device
    tile: int  # rows per band at the input height ref_height; scaled with the resolution
    ref_height: int
    most: int = 0  # the most bands one call of ranges() has made (the progress bar shows it)

    def ranges(self, height: int, row_elements: int = 0, halo: int = 0, stride: int = 1) -> list:
        """[lo, hi) bands of `height` rows. row_elements: the largest tensor's elements per band
        row (input rows count `stride` times, plus `halo` rows): bands shrink to keep it under
        2^31, past which torch / cuDNN kernels take 32-bit-unsafe or slow fallbacks (a 16K-wide
        SD VAE decoder's 256-channel convs reached 2^31 at the scaled band height)."""
        rows = max(1, self.tile * height // self.ref_height)
        if row_elements:
            rows = min(rows, max(1, (_INDEX_LIMIT // row_elements - halo) // stride))
        bands = [(a, min(a + rows, height)) for a in range(0, height, rows)]
        self.most = max(self.most, len(bands))
        return bands


@dataclasses.dataclass(frozen=True)
class _Rows:
    """A full-height activation read band by band: get(a, b) = rows [a, b) on the compute device."""

    height: int
    get: Callable[[int, int], torch.Tensor]
    batch: int
    width: int


def _row_elements(x) -> int:
    return x.shape[0] * x.shape[1] * x.shape[3]


def _bar(progress, label: str):
    """tqdm settings for _exact's bar from a `progress` argument (None: no bar)."""
    if isinstance(progress, dict):
        return {"desc": label, **progress}
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or a dict of tqdm settings, got {type(progress).__name__}")
    return {"desc": label} if progress else None


def _exact(vae, steps, x, tile, ref_height, offload_device, bar):
    """The VAE's layers (steps) in turn, each over bands of rows; bar: tqdm settings (its desc
    gains the band count: the nominal one, then the most any layer took where bands shrank
    under the 2^31-element cap), or None for no bar."""
    device = x.device
    wrong = {str(p.device) for p in vae.parameters() if p.device != device}
    if wrong:  # bands run as plain functional ops: diffusers/accelerate offload hooks would not fire
        raise ValueError(f"mode 'exact': the VAE's parameters are on {sorted(wrong)}, the input on {device}; "
                         "move the VAE to the input's device (use offload_device for activations)")
    store = device if offload_device is None else torch.device(offload_device)
    bands = _Bands(device, store, tile, ref_height)
    with torch.no_grad():
        x = x.to(store)
        bar = {"unit": "layer", **(bar or {}), "disable": bar is None}
        label, nominal = bar.get("desc", ""), len(bands.ranges(ref_height))
        bar["desc"] = f"{label} ({nominal} band{'s' * (nominal != 1)})"
        with tqdm(steps, **bar) as layers:
            for step in layers:
                x = step(x, bands)
                if bands.most > nominal:  # the 2^31 cap (or rounding at a small height) made more
                    layers.set_description(f"{label} (up to {bands.most} bands)", refresh=False)
    return x.to(device)


def _stored(x, bands) -> _Rows:
    return _Rows(x.shape[2], lambda a, b: x[:, :, a:b].to(bands.device), x.shape[0], x.shape[3])


def _normed(x, norm, act, bands) -> _Rows:
    """GroupNorm (then act) of x with whole-image statistics, applied band by band."""
    mean, rstd = _group_stats(x, norm, bands)

    def get(a, b):
        y = _group_norm(x[:, :, a:b].to(bands.device), norm, mean, rstd)
        return y if act is None else act(y)

    return _Rows(x.shape[2], get, x.shape[0], x.shape[3])


def _upsampled(src: _Rows) -> _Rows:
    """Nearest 2x upsampling: output row i is input row i // 2, so any band maps onto input rows."""
    def get(a, b):
        lo = a // 2
        y = F.interpolate(src.get(lo, (b + 1) // 2), scale_factor=2.0, mode="nearest")
        return y[:, :, a - 2 * lo: a - 2 * lo + b - a]

    return _Rows(2 * src.height, get, src.batch, 2 * src.width)


def _grouped(t, groups):
    return t.to(accumulation_dtype(t.dtype)).reshape(t.shape[0], groups, -1)


def _group_stats(x, norm, bands):
    """Per (sample, group) mean and 1/std over the whole image, from per-band fp32 sums (fp64 for fp64)."""
    b, groups = x.shape[0], norm.num_groups
    count = x[0].numel() // groups
    total = torch.zeros(b, groups, device=bands.device, dtype=accumulation_dtype(x.dtype))
    for lo, hi in bands.ranges(x.shape[2], _row_elements(x)):
        total += _grouped(x[:, :, lo:hi].to(bands.device), groups).sum(-1)
    mean = (total / count).unsqueeze(-1)
    squares = torch.zeros_like(total)
    for lo, hi in bands.ranges(x.shape[2], _row_elements(x)):  # centred second pass: no E[x^2] - E[x]^2 cancellation
        centred = _grouped(x[:, :, lo:hi].to(bands.device), groups) - mean
        squares += (centred * centred).sum(-1)
    return mean, torch.rsqrt(squares / count + norm.eps).unsqueeze(-1)


def _group_norm(t, norm, mean, rstd):
    y = ((_grouped(t, norm.num_groups) - mean) * rstd).reshape(t.shape)
    if norm.affine:
        y = y * norm.weight.to(y.dtype).view(1, -1, 1, 1) + norm.bias.to(y.dtype).view(1, -1, 1, 1)
    return y.to(t.dtype)


def _conv(conv, src: _Rows, bands, pad=(0, 0, 0, 0), epilogue=None, out=None, epilogue_row_elements=0):
    """conv over src band by band. pad = (left, right, top, bottom) zeros added before the conv's
    own padding (Downsample2D's asymmetric (0, 1, 0, 1)); rows outside the image are zeros, rows
    inside come from the neighbouring bands. epilogue(y, lo, hi) post-processes a band (its
    largest tensor epilogue_row_elements per row); out (same shape as the result) receives the
    bands in place."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    left, right, top, bottom = pad[0] + pw, pad[1] + pw, pad[2] + ph, pad[3] + ph
    height = (src.height + top + bottom - kh) // sh + 1
    in_row = src.batch * conv.in_channels * (src.width + left + right)
    out_row = max(src.batch * conv.out_channels * ((src.width + left + right - kw) // sw + 1), epilogue_row_elements)
    # the input band holds `stride` rows per output row plus kh (+ 2: _upsampled's whole source rows)
    in_bands, out_bands = bands.ranges(height, in_row, halo=kh + 2, stride=sh), bands.ranges(height, out_row)
    for lo, hi in min(in_bands, out_bands, key=lambda ranges: ranges[0][1]):  # the shorter bands
        first, last = lo * sh - top, (hi - 1) * sh + kh - top  # input rows [first, last), maybe outside
        rows = src.get(max(first, 0), min(last, src.height))
        rows = F.pad(rows, (left, right, max(-first, 0), max(last - src.height, 0)))
        y = F.conv2d(rows, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
        if epilogue is not None:
            y = epilogue(y, lo, hi)
        if out is None:
            out = y.new_empty(y.shape[:2] + (height, y.shape[3]), device=bands.store)
        out[:, :, lo:hi] = y
    return out


def _resnet(res, x, bands):
    h = _conv(res.conv1, _normed(x, res.norm1, res.nonlinearity, bands), bands)

    def add_shortcut(y, lo, hi):  # the shortcut reads only its own rows of x
        shortcut = x[:, :, lo:hi].to(bands.device)
        if res.conv_shortcut is not None:
            shortcut = res.conv_shortcut(shortcut)
        return (shortcut + y) / res.output_scale_factor

    in_place = x if res.conv_shortcut is None else None  # band rows of x are dead once read
    return _conv(res.conv2, _normed(h, res.norm2, res.nonlinearity, bands), bands, epilogue=add_shortcut,
                 out=in_place, epilogue_row_elements=_row_elements(x))


def _attention(attn, x, bands):
    """Softmax self-attention: keys/values of every token on the compute device, queries by band."""
    b, c, height, width = x.shape
    src = _normed(x, attn.group_norm, None, bands)

    def tokens(lo, hi):  # (B, rows * W, C), row-major like the untiled view(B, C, HW)
        return src.get(lo, hi).flatten(2).transpose(1, 2)

    def heads(t):
        return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

    keys = values = None
    for lo, hi in bands.ranges(height, _row_elements(x)):
        t = tokens(lo, hi)
        k, v = heads(attn.to_k(t)), heads(attn.to_v(t))
        if keys is None:
            keys = k.new_empty(k.shape[:2] + (height * width, k.shape[3]))
            values = v.new_empty(v.shape[:2] + (height * width, v.shape[3]))
        keys[:, :, lo * width:hi * width], values[:, :, lo * width:hi * width] = k, v
    # The keys of every token: one sample's at a time where the batch's pass 2^31 elements (at 16384^2
    # one SD sample's are 2^31 exactly: their largest offset, 2^31 - 1, still fits 32-bit indexing).
    per_sample = keys.numel() > _INDEX_LIMIT and b > 1
    for lo, hi in bands.ranges(height, _row_elements(x)):  # out band [lo, hi) reads only rows [lo, hi) of x
        q = heads(attn.to_q(tokens(lo, hi)))
        if per_sample:
            o = torch.cat([F.scaled_dot_product_attention(q[i:i + 1], keys[i:i + 1], values[i:i + 1]) for i in range(b)])
        else:
            o = F.scaled_dot_product_attention(q, keys, values)
        o = attn.to_out[1](attn.to_out[0](o.transpose(1, 2).flatten(2)))
        o = o.transpose(1, 2).reshape(b, c, hi - lo, width)
        if attn.residual_connection:
            o = o + x[:, :, lo:hi].to(bands.device)
        x[:, :, lo:hi] = o / attn.rescale_output_factor
    return x


def _upsample(up, x, bands):
    return _conv(_upsample_conv(up), _upsampled(_stored(x, bands)), bands)


def _downsample(down, x, bands):
    pad = (0, 1, 0, 1) if down.padding == 0 else (0, 0, 0, 0)  # diffusers pads right/bottom when padding=0
    return _conv(down.conv, _stored(x, bands), bands, pad=pad)


def _conv_step(conv):
    return lambda x, bands: _conv(conv, _stored(x, bands), bands)


def _out_step(norm, act, conv):
    return lambda x, bands: _conv(conv, _normed(x, norm, act, bands), bands)


# --- "exact": the walk over diffusers' module structure, checked before any compute --------


def _unsupported(name, module, why):
    raise NotImplementedError(f"mode 'exact': vae.{name} ({type(module).__name__}) is not supported: {why}")


def _decoder_steps(vae):
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D

    dec = _check_type(vae.decoder, Decoder, "decoder")
    steps = [_checked_conv(vae.post_quant_conv, "post_quant_conv")] if vae.post_quant_conv is not None else []
    steps += [_checked_conv(dec.conv_in, "decoder.conv_in")] + _mid_steps(dec.mid_block, "decoder.mid_block")
    for i, block in enumerate(dec.up_blocks):
        name = f"decoder.up_blocks.{i}"
        _check_type(block, UpDecoderBlock2D, name)
        steps += [_checked_resnet(r, f"{name}.resnets.{j}") for j, r in enumerate(block.resnets)]
        steps += [_checked_upsample(u, f"{name}.upsamplers.{j}") for j, u in enumerate(block.upsamplers or [])]
    return steps + [_checked_out(dec, "decoder")]


def _encoder_steps(vae):
    from diffusers.models.autoencoders.vae import Encoder
    from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D

    enc = _check_type(vae.encoder, Encoder, "encoder")
    steps = [_checked_conv(enc.conv_in, "encoder.conv_in")]
    for i, block in enumerate(enc.down_blocks):
        name = f"encoder.down_blocks.{i}"
        _check_type(block, DownEncoderBlock2D, name)
        steps += [_checked_resnet(r, f"{name}.resnets.{j}") for j, r in enumerate(block.resnets)]
        steps += [_checked_downsample(d, f"{name}.downsamplers.{j}") for j, d in enumerate(block.downsamplers or [])]
    steps += _mid_steps(enc.mid_block, "encoder.mid_block") + [_checked_out(enc, "encoder")]
    if vae.quant_conv is not None:
        steps.append(_checked_conv(vae.quant_conv, "quant_conv"))
    return steps


def _mid_steps(mid, name):
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

    _check_type(mid, UNetMidBlock2D, name)
    steps = [_checked_resnet(mid.resnets[0], f"{name}.resnets.0")]
    for i, (attn, res) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attn is not None:
            steps.append(_checked_attention(attn, f"{name}.attentions.{i}"))
        steps.append(_checked_resnet(res, f"{name}.resnets.{i + 1}"))
    return steps


def _check_type(module, cls, name):
    if type(module) is not cls:  # exact type: a subclass may change forward()
        _unsupported(name, module, f"expected diffusers' {cls.__name__}")
    return module


def _check_conv(conv, name):
    if type(conv) is not nn.Conv2d:
        _unsupported(name, conv, "expected a plain nn.Conv2d (LoRA-wrapped or custom convs are not walked)")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or conv.dilation != (1, 1):
        _unsupported(name, conv, "needs numeric zero padding and no dilation")


def _check_norm(norm, name):
    if type(norm) is not nn.GroupNorm:
        _unsupported(name, norm, "expected nn.GroupNorm (spatial-norm / conditioned decoders are not supported)")


def _check_act(act, name):
    if not isinstance(act, _ELEMENTWISE_ACTIVATIONS):
        known = ", ".join(a.__name__ for a in _ELEMENTWISE_ACTIVATIONS)
        _unsupported(name, act, f"expected an element-wise activation ({known})")


def _check_dropout(dropout, name):
    if dropout.training and dropout.p > 0:
        _unsupported(name, dropout, "active dropout (call vae.eval())")


def _checked_conv(conv, name):
    _check_conv(conv, name)
    return _conv_step(conv)


def _checked_out(coder, name):
    _check_norm(coder.conv_norm_out, f"{name}.conv_norm_out")
    _check_act(coder.conv_act, f"{name}.conv_act")
    _check_conv(coder.conv_out, f"{name}.conv_out")
    return _out_step(coder.conv_norm_out, coder.conv_act, coder.conv_out)


def _checked_resnet(res, name):
    from diffusers.models.resnet import ResnetBlock2D

    _check_type(res, ResnetBlock2D, name)
    if res.time_emb_proj is not None or res.upsample is not None or res.downsample is not None:
        _unsupported(name, res, "time embedding or built-in up/downsampling")
    for part in ("norm1", "norm2"):
        _check_norm(getattr(res, part), f"{name}.{part}")
    for part in ("conv1", "conv2"):
        _check_conv(getattr(res, part), f"{name}.{part}")
    shortcut = res.conv_shortcut
    if shortcut is not None and (type(shortcut) is not nn.Conv2d or shortcut.kernel_size != (1, 1)
                                 or shortcut.stride != (1, 1) or shortcut.padding != (0, 0)):
        _unsupported(f"{name}.conv_shortcut", shortcut, "expected a 1x1, stride-1, unpadded nn.Conv2d")
    _check_act(res.nonlinearity, f"{name}.nonlinearity")
    _check_dropout(res.dropout, f"{name}.dropout")
    return functools.partial(_resnet, res)


def _checked_attention(attn, name):
    from diffusers.models.attention_processor import (Attention, AttnProcessor, AttnProcessor2_0,
                                                      XFormersAttnProcessor)

    _check_type(attn, Attention, name)
    if type(attn.processor) not in (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor):
        _unsupported(name, attn, f"processor {type(attn.processor).__name__} (only plain softmax processors)")
    if (attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None
            or attn.is_cross_attention or attn.add_k_proj is not None or not attn.scale_qk):
        _unsupported(name, attn, "expected the VAE's plain self-attention (no spatial/q/k norms, "
                                 "cross or added key/values, default 1/sqrt(d) scale)")
    _check_norm(attn.group_norm, f"{name}.group_norm")
    _check_dropout(attn.to_out[1], f"{name}.to_out.1")
    return functools.partial(_attention, attn)


def _checked_upsample(up, name):
    from diffusers.models.upsampling import Upsample2D

    _check_type(up, Upsample2D, name)
    if up.norm is not None or up.use_conv_transpose or not up.interpolate or not up.use_conv:
        _unsupported(name, up, "expected nearest 2x interpolation then a conv, without norm")
    _check_conv(_upsample_conv(up), f"{name}.{up.name}")
    return functools.partial(_upsample, up)


def _upsample_conv(up):
    return up.conv if up.name == "conv" else up.Conv2d_0


def _checked_downsample(down, name):
    from diffusers.models.downsampling import Downsample2D

    _check_type(down, Downsample2D, name)
    if down.norm is not None or not down.use_conv:
        _unsupported(name, down, "expected a strided conv without norm")
    _check_conv(down.conv, f"{name}.conv")
    return functools.partial(_downsample, down)
