"""The knobs of LinFusion's high-resolution cascade (highres.py) and how they are applied.

The stage sizes (size_multiple, cascade_sizes) and the default strengths; MemoryOptions, every
one exact but VAE "blend" tiling, and memory_options_applied, which puts them on a UNet for one
stage (chunked CFG rows, token-chunked attn1, attn2 and feed-forward, row parallelism over
torch.distributed ranks); the VAE's precision and tiling arguments. Shared by the cascade
(highres.py) and its memory model (highres_memory.py), which imports nothing from the cascade.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ...ops._checks import is_integer
from .. import vae_tiling
from .._modules import swap_submodule
from .attention import GeneralizedLinearAttention

DEFAULT_STRENGTHS = (0.4, 0.3, 0.2, 0.1)


@dataclass(frozen=True)
class MemoryOptions:
    """How a stage trades speed for memory. Every option but vae_tiling="blend" is exact.

    cfg_batch_size: rows of the classifier-free-guidance batch (uncond + cond) per UNet call;
        None runs the whole batch at once, 1 one row at a time (halves the UNet activations).
    token_chunk_size: LinFusion's attn1, and each transformer block's cross-attention attn2 (its
        queries), run over chunks of this many tokens (None: whole).
    ff_chunk_size: each transformer block's feed-forward runs over chunks of this many
        tokens (None: whole); its 4x-wide hidden layer is the UNet's largest activation.
    vae_tiling, vae_tile_size, vae_tile_overlap, vae_offload_device: see
        mmfast.models.vae_tiling.decode_latents (tile sizes in latent px for decode; a set
        size encodes the same region, in image px; unset, each pass takes its own default:
        64 latent px to decode, 512 image px to encode, the same region at 8x).
    """

    cfg_batch_size: Optional[int] = None
    token_chunk_size: Optional[int] = None
    ff_chunk_size: Optional[int] = None
    vae_tiling: str = "none"
    vae_tile_size: Optional[int] = None
    vae_tile_overlap: Optional[int] = None
    vae_offload_device: Optional[str] = None

    def __post_init__(self):
        for name in ("cfg_batch_size", "token_chunk_size", "ff_chunk_size"):
            value = getattr(self, name)
            if value is not None and (not is_integer(value) or value < 1):  # numpy ints pass, bools do not
                raise ValueError(f"MemoryOptions: {name} must be None or an int >= 1, got {value!r}")
        if self.vae_tiling not in vae_tiling.VAE_TILING_MODES:
            raise ValueError(f"MemoryOptions: vae_tiling must be one of {vae_tiling.VAE_TILING_MODES}, "
                             f"got {self.vae_tiling!r}")
        self._check_vae_fields()

    def _check_vae_fields(self) -> None:
        """The VAE fields each apply to some modes only: a field the mode ignores is an error."""
        tile, overlap = self.vae_tile_size, self.vae_tile_overlap
        if tile is not None and (not is_integer(tile) or tile < 1):
            raise ValueError(f"MemoryOptions: vae_tile_size must be None or an int >= 1, got {tile!r}")
        if tile is not None and self.vae_tiling == "none":
            raise ValueError("MemoryOptions: vae_tile_size needs vae_tiling 'blend' or 'exact'")
        if overlap is not None and self.vae_tiling != "blend":
            raise ValueError("MemoryOptions: vae_tile_overlap applies to vae_tiling='blend' only")
        limit = vae_tiling.default_tile_size(False) if tile is None else tile
        if overlap is not None and (not is_integer(overlap) or not 0 <= overlap < limit):
            raise ValueError(f"MemoryOptions: vae_tile_overlap must be an int with 0 <= overlap < {limit}, "
                             f"got {overlap!r}")
        if self.vae_offload_device is not None and self.vae_tiling != "exact":
            raise ValueError("MemoryOptions: vae_offload_device applies to vae_tiling='exact' only")


# --- the cascade's sizes -------------------------------------------------------------------


def size_multiple(pipe) -> int:
    """Pixels a stage's height and width must be a multiple of: VAE factor x UNet downsampling,
    and of 8 (diffusers' pipelines require it)."""
    downsamplings = len(pipe.unet.config.block_out_channels) - 1
    return math.lcm(pipe.vae_scale_factor * 2 ** downsamplings, 8)


def _check_size(height, width) -> None:
    """TypeError for a height or width that is not an int, ValueError for one below 1 (pixels)."""
    for name, value in (("height", height), ("width", width)):
        if not is_integer(value):
            raise TypeError(f"generate_highres: {name} must be an int (pixels), got {value!r}")
        if value < 1:
            raise ValueError(f"generate_highres: {name} must be >= 1 (pixels), got {value}")


def cascade_sizes(height: int, width: int, stages: int, base_size: Optional[int] = None,
                  multiple: int = 64) -> List[Tuple[int, int]]:
    """(height, width) of the base stage and of each of `stages` doublings up to the target.

    base_size: the long side of the base stage; it must equal max(height, width) / 2**stages
    (the default). Every size must be a multiple of `multiple` px.
    """
    _check_size(height, width)
    long_side = max(height, width)
    expected = long_side / 2 ** stages
    if base_size is not None and base_size != expected:
        raise ValueError(
            f"generate_highres: with {stages} upscaling strengths the base long side is {long_side} / 2**{stages} "
            f"= {expected:g} px, not base_size={base_size}; change base_size or the number of strengths"
        )
    sizes = [(height // 2 ** (stages - i), width // 2 ** (stages - i)) for i in range(stages + 1)]
    for h, w in sizes:
        if h % multiple or w % multiple or h * 2 ** stages < height:
            hint = (f"pick base_size a multiple of {multiple}" if base_size is not None and base_size % multiple
                    else f"pick height and width divisible by {multiple * 2 ** stages}")
            raise ValueError(
                f"generate_highres: every stage size must be a multiple of {multiple} px; height x width "
                f"{height}x{width} halved {stages} times gives {sizes[0][0]}x{sizes[0][1]} (stage {h}x{w} "
                f"fails): {hint}"
            )
    return sizes


# --- memory knobs applied from outside the model -----------------------------------------


class TokenChunkedFeedForward(nn.Module):
    """Runs a feed-forward over chunks of tokens into one preallocated output (exact).

    diffusers' own set_chunk_feed_forward needs the token count divisible by the chunk at
    every level and concatenates the chunks (twice the output's memory); this needs neither.
    """

    def __init__(self, ff: nn.Module, chunk_size: int):
        super().__init__()
        self.ff, self.chunk_size = ff, chunk_size

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        tokens = hidden_states.shape[1]
        if tokens <= self.chunk_size:
            return self.ff(hidden_states, *args, **kwargs)
        out = None
        for start in range(0, tokens, self.chunk_size):
            result = self.ff(hidden_states[:, start:start + self.chunk_size], *args, **kwargs)
            if out is None:
                out = result.new_empty(hidden_states.shape[:2] + result.shape[2:])
            out[:, start:start + self.chunk_size] = result
        return out


class TokenChunkedCrossAttention(TokenChunkedFeedForward):
    """A cross-attention (attn2) over chunks of query tokens (exact: each query attends to the
    same text tokens on its own; the processor, e.g. an IP-Adapter's, is the layer's own)."""


def _feed_forward_names(unet: nn.Module) -> List[str]:
    from diffusers.models.attention import FeedForward

    return [name for name, module in unet.named_modules() if isinstance(module, FeedForward)]


def _cross_attention_names(unet: nn.Module) -> List[str]:
    """The transformer blocks' attn2 layers (their keys and values are the text tokens)."""
    from diffusers.models.attention_processor import Attention

    return [name for name, module in unet.named_modules()
            if name.rsplit(".", 1)[-1] == "attn2" and isinstance(module, Attention) and module.is_cross_attention]


def _take_rows(value, rows: slice, batch: int):
    """The rows of every batch-sized tensor inside value (tensors, lists, tuples, dicts)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)):
        return type(value)(_take_rows(item, rows, batch) for item in value)
    if isinstance(value, dict):
        return {key: _take_rows(item, rows, batch) for key, item in value.items()}
    return value


def _concat_outputs(outputs: list):
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, tuple):
        return tuple(_concat_outputs([out[i] for out in outputs]) for i in range(len(first)))
    return type(first)(sample=torch.cat([out.sample for out in outputs]))  # diffusers' UNet2DConditionOutput


def _row_chunked(forward: Callable, rows_per_call: int) -> Callable:
    """forward(sample, ...) called on rows_per_call rows of the batch at a time (exact)."""
    def chunked(sample, *args, **kwargs):
        batch = sample.shape[0]
        if batch <= rows_per_call:
            return forward(sample, *args, **kwargs)
        outputs = []
        for start in range(0, batch, rows_per_call):
            rows = slice(start, start + rows_per_call)
            outputs.append(forward(sample[rows], *_take_rows(args, rows, batch), **_take_rows(kwargs, rows, batch)))
        return _concat_outputs(outputs)
    return chunked


def _split_spatial(value, group):
    """This rank's rows of every (B, C, H, W) tensor (ControlNet residuals, the latents)."""
    from .row_parallel import split_rows

    if isinstance(value, torch.Tensor):
        return split_rows(value, group) if value.dim() == 4 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_split_spatial(item, group) for item in value)
    return value


def _check_same_on_every_rank(sample: torch.Tensor, group) -> None:
    """Every rank must run the same cascade (same seed): bands of different latents make a patchwork."""
    import torch.distributed as dist

    checksum = sample.double().sum().reshape(1)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise RuntimeError("generate_highres: the ranks hold different latents; give every rank the same prompt "
                           "and a generator with the same seed (the row split assumes one shared cascade)")


def _row_parallel(forward: Callable, unet: nn.Module, group=None) -> Callable:
    """forward on this rank's band of latent rows, gathered back: every rank gets the full output."""
    from .row_parallel import gather_rows, row_parallel_unet, split_rows

    def banded(sample, timestep, encoder_hidden_states, *args, **kwargs):
        _check_same_on_every_rank(sample, group)
        spatial = ("down_block_additional_residuals", "mid_block_additional_residual")
        kwargs = {key: _split_spatial(value, group) if key in spatial else value for key, value in kwargs.items()}
        with row_parallel_unet(unet, group):
            out = forward(split_rows(sample, group), timestep, encoder_hidden_states, *args, **kwargs)
        if isinstance(out, tuple):
            return (gather_rows(out[0], group),) + tuple(out[1:])
        return type(out)(sample=gather_rows(out.sample, group))
    return banded


def row_parallel_requested(row_parallel: Optional[bool]) -> bool:
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if row_parallel and not initialised:
        raise RuntimeError("generate_highres: row_parallel=True needs torch.distributed initialised")
    return initialised and dist.get_world_size() > 1 if row_parallel is None else bool(row_parallel)


@contextlib.contextmanager
def memory_options_applied(unet: nn.Module, options: MemoryOptions, row_parallel: bool = False):
    """Applies the UNet-side options (CFG rows, token and feed-forward chunks, row split).

    The options decide: a token chunk size set earlier on the LinFusion modules is replaced for
    the duration (and restored afterwards), also by None.
    """
    attention = [m for m in unet.modules() if isinstance(m, GeneralizedLinearAttention)]
    if options.token_chunk_size is not None and not attention:
        raise ValueError("generate_highres: token_chunk_size chunks LinFusion's attn1; mount LinFusion first")
    if options.token_chunk_size is not None and row_parallel:
        raise ValueError("generate_highres: token_chunk_size does not combine with row_parallel (the token-parallel "
                         "attention runs each rank's band whole); drop one of them")
    previous_chunks = [module.token_chunk_size for module in attention]
    saved_forward = unet.__dict__.get("forward")  # e.g. accelerate's hook, put back afterwards
    swapped = []
    try:
        for module in attention:
            module.token_chunk_size = options.token_chunk_size
        if options.ff_chunk_size is not None:
            for name in _feed_forward_names(unet):
                ff = unet.get_submodule(name)
                swapped.append((name, swap_submodule(unet, name, TokenChunkedFeedForward(ff, options.ff_chunk_size))))
        if options.token_chunk_size is not None:
            for name in _cross_attention_names(unet):
                attn2 = unet.get_submodule(name)
                swapped.append((name, swap_submodule(unet, name,
                                                     TokenChunkedCrossAttention(attn2, options.token_chunk_size))))
        forward = unet.forward  # bound; an accelerate offload hook's wrapper when one is installed
        if row_parallel:
            forward = _row_parallel(forward, unet)
        if options.cfg_batch_size is not None:
            forward = _row_chunked(forward, options.cfg_batch_size)
        unet.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
        yield unet
    finally:
        if saved_forward is None:
            unet.__dict__.pop("forward", None)
        else:
            unet.forward = saved_forward
        for name, ff in reversed(swapped):
            swap_submodule(unet, name, ff)
        for module, chunk in zip(attention, previous_chunks):
            module.token_chunk_size = chunk


# --- VAE passes and conversions ----------------------------------------------------------


def vae_needs_upcast(pipe) -> bool:
    """Whether the pipeline's fp16 VAE runs in fp32, as diffusers runs it: SD-XL-family pipelines
    honour the VAE config's force_upcast (SD-XL's VAE overflows in fp16); SD-1.5 / 2.1's never
    read it, and AutoencoderKL defaults it to True, so their fp16 VAEs stay fp16."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    vae = pipe.vae
    # diffusers' pipelines that honour force_upcast define upcast_vae (SD-XL, PAG-XL, Kolors, ...);
    # the SD-XL classes are named too, in case a later diffusers drops that deprecated method
    reads_flag = hasattr(type(pipe), "upcast_vae") or isinstance(
        pipe, (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline))
    return reads_flag and bool(getattr(vae.config, "force_upcast", False)) and vae.dtype == torch.float16


@contextlib.contextmanager
def vae_precision(pipe):
    """The pipeline's VAE in the dtype it runs in (vae_needs_upcast); yields that dtype."""
    vae = pipe.vae
    upcast = vae_needs_upcast(pipe)
    # nn.Module.to, not ModelMixin.to: the latter logs a warning on every cast
    if upcast:
        nn.Module.to(vae, torch.float32)
    try:
        yield torch.float32 if upcast else vae.dtype
    finally:
        if upcast:
            nn.Module.to(vae, torch.float16)


def vae_tiling_kwargs(options: MemoryOptions, encode: bool, factor: int) -> dict:
    if options.vae_tiling == "none":
        return {}
    scale = factor if encode else 1  # encode tiles are in image px, decode tiles in latent px
    kwargs = {"mode": options.vae_tiling}
    if options.vae_tile_size is not None:
        kwargs["tile_size"] = options.vae_tile_size * scale
    if options.vae_tile_overlap is not None and options.vae_tiling == "blend":
        kwargs["tile_overlap"] = options.vae_tile_overlap * scale
    if options.vae_offload_device is not None and options.vae_tiling == "exact":
        kwargs["offload_device"] = options.vae_offload_device
    return kwargs
