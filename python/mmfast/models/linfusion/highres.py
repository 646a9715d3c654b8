"""LinFusion's ultra-high-resolution pipeline: the SDEdit cascade up to 16K, within one GPU's memory.

The official recipe (LinFusion's notebooks `ultra_text2image_w_sdedit.ipynb` and
`superres_sdxl_low_w_mem.ipynb`): generate at the base resolution, then repeatedly upscale
by 2 and run img2img (SDEdit, Meng et al. 2022) with decreasing strength, 0.4, 0.3, 0.2,
0.1 of 50 steps: 1024 -> 2048 -> 4096 -> 8192 -> 16384 px on the long side.

    from mmfast.models.linfusion import LinFusion, MemoryOptions, generate_highres
    LinFusion.construct_for(pipe, pretrained=LINFUSION_DIR)
    out = generate_highres(pipe, prompt, height=8192, width=16384, return_stages=True,
                           memory=MemoryOptions(cfg_batch_size=1, token_chunk_size=65536,
                                                ff_chunk_size=65536, vae_tiling="blend"))
    out.image.save("16k.png"); print(out.stages)   # or memory_budget_bytes=80e9: planned per stage

Memory knobs (MemoryOptions), all exact (equal up to floating-point summation order) but VAE
"blend" tiling: the CFG batch (uncond, cond)
run one row at a time; attn1 (LinFusion) and the feed-forward over token chunks; the VAE
encode/decode tiled (mmfast.models.vae_tiling). `estimate_highres_memory` predicts each
stage's peak before running (see highres_memory.py); with `memory_budget_bytes`,
generate_highres picks the lightest options that fit per stage. When torch.distributed is
initialised with more than one rank, each UNet call is split by latent rows over the ranks
(row_parallel.py), exact against one process.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...memory import PeakMemory
from .. import vae_tiling
from .._modules import swap_submodule
from .attention import GeneralizedLinearAttention

DEFAULT_STRENGTHS = (0.4, 0.3, 0.2, 0.1)


@dataclass(frozen=True)
class MemoryOptions:
    """How a stage trades speed for memory. Every option but vae_tiling="blend" is exact.

    cfg_batch_size: rows of the classifier-free-guidance batch (uncond + cond) per UNet call;
        None runs the whole batch at once, 1 one row at a time (halves the UNet activations).
    token_chunk_size: LinFusion attn1 runs over chunks of this many tokens (None: whole).
    ff_chunk_size: each transformer block's feed-forward runs over chunks of this many
        tokens (None: whole); its 4x-wide hidden layer is the UNet's largest activation.
    vae_tiling, vae_tile_size, vae_tile_overlap, vae_offload_device: see
        mmfast.models.vae_tiling.decode_latents (tile sizes in latent px for decode; the
        encode uses the same region, in image px).
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
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MemoryOptions: {name} must be None or an int >= 1, got {value!r}")
        if self.vae_tiling not in vae_tiling.VAE_TILING_MODES:
            raise ValueError(f"MemoryOptions: vae_tiling must be one of {vae_tiling.VAE_TILING_MODES}, "
                             f"got {self.vae_tiling!r}")
        self._check_vae_fields()

    def _check_vae_fields(self) -> None:
        """The VAE fields each apply to some modes only: a field the mode ignores is an error."""
        tile, overlap = self.vae_tile_size, self.vae_tile_overlap
        if tile is not None and (not isinstance(tile, int) or tile < 1):
            raise ValueError(f"MemoryOptions: vae_tile_size must be None or an int >= 1, got {tile!r}")
        if tile is not None and self.vae_tiling == "none":
            raise ValueError("MemoryOptions: vae_tile_size needs vae_tiling 'blend' or 'exact'")
        if overlap is not None and self.vae_tiling != "blend":
            raise ValueError("MemoryOptions: vae_tile_overlap applies to vae_tiling='blend' only")
        limit = vae_tiling.default_tile_size(False) if tile is None else tile
        if overlap is not None and (not isinstance(overlap, int) or not 0 <= overlap < limit):
            raise ValueError(f"MemoryOptions: vae_tile_overlap must be an int with 0 <= overlap < {limit}, "
                             f"got {overlap!r}")
        if self.vae_offload_device is not None and self.vae_tiling != "exact":
            raise ValueError("MemoryOptions: vae_offload_device applies to vae_tiling='exact' only")


@dataclass
class HighResStage:
    """One stage of the cascade: its size, how much it denoised, its time and peak memory."""

    index: int
    height: int
    width: int
    strength: Optional[float]  # None: the text-to-image base stage
    denoising_steps: int
    seconds: float
    # The stage's peak, everything included: CUDA max_memory_allocated or the CPU peak resident set.
    peak_memory_bytes: Optional[int]
    # The part of it above what was in use when the stage started (the memory model's stage_bytes).
    stage_memory_bytes: Optional[int]
    options: MemoryOptions
    image: Optional[object] = None  # PIL.Image when return_stages=True (and for the last stage)


@dataclass
class HighResOutput:
    image: object  # PIL.Image
    stages: List[HighResStage] = field(default_factory=list)


# --- the cascade's sizes -------------------------------------------------------------------


def size_multiple(pipe) -> int:
    """Pixels a stage's height and width must be a multiple of: VAE factor x UNet downsampling,
    and of 8 (diffusers' pipelines require it)."""
    downsamplings = len(pipe.unet.config.block_out_channels) - 1
    return math.lcm(pipe.vae_scale_factor * 2 ** downsamplings, 8)


def cascade_sizes(height: int, width: int, stages: int, base_size: Optional[int] = None,
                  multiple: int = 64) -> List[Tuple[int, int]]:
    """(height, width) of the base stage and of each of `stages` doublings up to the target.

    base_size: the long side of the base stage; it must equal max(height, width) / 2**stages
    (the default). Every size must be a multiple of `multiple` px.
    """
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
            raise ValueError(
                f"generate_highres: every stage size must be a multiple of {multiple} px; {height}x{width} halved "
                f"{stages} times gives {sizes[0][0]}x{sizes[0][1]} (stage {h}x{w} fails). Pick height and width "
                f"divisible by {multiple * 2 ** stages}"
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


def _feed_forward_names(unet: nn.Module) -> List[str]:
    from diffusers.models.attention import FeedForward

    return [name for name, module in unet.named_modules() if isinstance(module, FeedForward)]


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


def _row_parallel_requested(row_parallel: Optional[bool]) -> bool:
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


def vae_needs_upcast(vae) -> bool:
    """SD-XL's VAE overflows in fp16 (config force_upcast): it runs in fp32, as in diffusers."""
    return bool(getattr(vae.config, "force_upcast", False)) and vae.dtype == torch.float16


@contextlib.contextmanager
def _vae_precision(vae):
    upcast = vae_needs_upcast(vae)
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


def decode(pipe, latents: torch.Tensor, options: MemoryOptions) -> torch.Tensor:
    with _vae_precision(pipe.vae) as dtype:
        return vae_tiling.decode_latents(pipe.vae, latents.to(dtype), **vae_tiling_kwargs(options, False, pipe.vae_scale_factor))


def encode(pipe, images: torch.Tensor, options: MemoryOptions, generator) -> torch.Tensor:
    with _vae_precision(pipe.vae) as dtype:
        latents = vae_tiling.encode_images(pipe.vae, images.to(dtype), generator=generator,
                                           **vae_tiling_kwargs(options, True, pipe.vae_scale_factor))
    return latents.to(pipe.unet.dtype)


def upscale2x(images: torch.Tensor) -> torch.Tensor:
    """Bicubic 2x, kept in [-1, 1]. The official notebooks resize with PIL's bicubic (a = -0.5);
    torch's bicubic uses a = -0.75, a slightly sharper kernel."""
    return F.interpolate(images, scale_factor=2, mode="bicubic", align_corners=False).clamp_(-1, 1)


def to_pil(images: torch.Tensor):
    """The first image of a [-1, 1] batch as a PIL image (8 bits made in fp32 on its device)."""
    from PIL import Image

    pixels = images[0].float().clamp(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


# --- the cascade ---------------------------------------------------------------------------


def _check_pipeline(pipe) -> None:
    for name in ("unet", "vae", "scheduler"):
        if getattr(pipe, name, None) is None:
            raise TypeError(f"generate_highres: needs a diffusers text-to-image pipeline with .{name} "
                            f"(StableDiffusionPipeline or StableDiffusionXLPipeline), got {type(pipe).__name__}")
    if getattr(pipe, "controlnet", None) is not None:
        raise TypeError("generate_highres: ControlNet pipelines are not supported (their img2img stages need a "
                        "control image per stage); LinFusion itself works with them (LinFusion.construct_for)")
    if not any(isinstance(m, GeneralizedLinearAttention) for m in pipe.unet.modules()):
        warnings.warn("generate_highres: LinFusion is not mounted; softmax self-attention is quadratic in the "
                      "token count and will not reach high resolutions (LinFusion.construct_for(pipe))", stacklevel=3)


def check_strengths(strengths: Sequence[float], steps: int) -> Tuple[float, ...]:
    """The strengths as floats; ValueError unless each is in (0, 1] and denoises >= 1 of `steps`."""
    strengths = tuple(float(s) for s in strengths)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"generate_highres: steps must be an int >= 1, got {steps!r}")
    if any(not 0 < s <= 1 for s in strengths):
        raise ValueError(f"generate_highres: strengths must be in (0, 1], got {strengths}")
    idle = [s for s in strengths if int(steps * s) < 1]
    if idle:  # diffusers' img2img would denoise nothing (an empty batch)
        needed = math.ceil(1 / min(strengths))
        while any(int(needed * s) < 1 for s in strengths):  # float rounding
            needed += 1
        raise ValueError(f"generate_highres: strength {idle[0]:g} of {steps} steps denoises int({steps} x {idle[0]:g}) "
                         f"= 0 steps; use steps >= {needed}")
    return strengths


def _check_one_image(prompt, pipeline_kwargs: dict) -> None:
    """The cascade carries one image from stage to stage (batching 16K images fits no GPU)."""
    if not isinstance(prompt, str) or pipeline_kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError("generate_highres: makes one image per call: pass one prompt string and no "
                         "num_images_per_prompt (call it once per image)")


def _image_to_image_pipeline(pipe):
    from diffusers import AutoPipelineForImage2Image

    return AutoPipelineForImage2Image.from_pipe(pipe)


def _denoise(pipe, img2img, index, size, strength, init_latents, common: dict):
    height, width = size
    if index == 0:
        return pipe(height=height, width=width, output_type="latent", **common).images
    return img2img(image=init_latents, strength=strength, output_type="latent", **common).images


@torch.no_grad()
def generate_highres(pipe, prompt, *, height: int, width: int, base_size: Optional[int] = None,
                     strengths: Sequence[float] = DEFAULT_STRENGTHS, steps: int = 50,
                     guidance_scale: float = 7.5, negative_prompt=None, generator=None,
                     memory=None, memory_budget_bytes: Optional[int] = None,
                     row_parallel: Optional[bool] = None, progress: bool = True,
                     return_stages: bool = False, **pipeline_kwargs):
    """The SDEdit cascade: text-to-image at the base size, then x2 + img2img per strength.

    Args:
        pipe: a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline (SD-1.5, 2.1, XL),
            LinFusion mounted on its UNet. The img2img stages use
            AutoPipelineForImage2Image.from_pipe(pipe) (the same modules).
        prompt, negative_prompt, guidance_scale, generator, **pipeline_kwargs: passed to every
            stage's pipeline call (diffusers semantics).
        height, width: the final size in px; each stage halves it, down to the base stage.
        base_size: the base stage's long side; must be max(height, width) / 2**len(strengths).
        strengths: img2img strength per upscaling stage; a stage denoises int(steps * strength)
            of `steps` steps (diffusers' img2img semantics).
        memory: MemoryOptions for every stage, or a sequence of one per stage (e.g. a plan made
            beforehand with plan_highres_memory). memory_budget_bytes instead picks, per stage,
            the lightest options whose predicted peak (estimate_highres_memory) fits; give one
            or neither (neither: everything unchunked and untiled).
        row_parallel: split each UNet call by latent rows over torch.distributed ranks; None
            (default): when torch.distributed is initialised with more than one rank.
        progress: diffusers' progress bar per stage, labelled with the stage and its size.
        return_stages: return HighResOutput (image + per-stage HighResStage with time, peak
            memory and image) instead of the image.

    Returns: the final PIL image, or HighResOutput.
    Raises: ValueError for sizes that do not halve into multiples of size_multiple(pipe), for
        a base_size that does not match, for memory and memory_budget_bytes together, or when no
        options fit the budget; TypeError for a pipeline without unet/vae/scheduler.
    """
    _check_pipeline(pipe)
    _check_one_image(prompt, pipeline_kwargs)
    if height < 1 or width < 1:
        raise ValueError(f"generate_highres: height and width must be positive, got {height}x{width}")
    if memory is not None and memory_budget_bytes is not None:
        raise ValueError("generate_highres: pass memory (fixed options) or memory_budget_bytes (planned), not both")
    strengths = check_strengths(strengths, steps)
    sizes = cascade_sizes(height, width, len(strengths), base_size, size_multiple(pipe))
    split_rows = _row_parallel_requested(row_parallel)
    plans = _stage_options(pipe, sizes, strengths, memory, memory_budget_bytes, guidance_scale, split_rows)
    img2img = _image_to_image_pipeline(pipe) if strengths else None
    common = dict(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                  guidance_scale=guidance_scale, generator=generator, **pipeline_kwargs)
    stages, carried = [], []  # carried: the previous stage's image, handed over (not held here)
    for index, (size, strength) in enumerate(zip(sizes, (None,) + strengths)):
        last = index == len(sizes) - 1
        stage, images = _run_stage(pipe, img2img, index, size, strength, carried, plans[index], common,
                                   split_rows, progress, return_stages or last)
        stages.append(stage)
        carried = [images]
        del images
    final = stages[-1].image
    if not return_stages:
        return final
    return HighResOutput(final, stages)


def _run_stage(pipe, img2img, index, size, strength, carried: list, options, common, split_rows, progress,
               make_image):
    label = f"stage {index} {size[1]}x{size[0]}" + ("" if strength is None else f" strength {strength:g}")
    with _progress_bars(pipe if index == 0 else img2img, label, progress):
        return _run_stage_measured(pipe, img2img, index, size, strength, carried, options, common, split_rows,
                                   make_image)


@contextlib.contextmanager
def _progress_bars(pipeline, label: str, progress: bool):
    """diffusers' progress bar labelled with the stage; the pipeline's own settings put back after."""
    saved = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(**{**saved, "desc": label, "disable": not progress})
    try:
        yield
    finally:
        pipeline._progress_bar_config = saved  # noqa: SLF001 (diffusers keeps it there)


def _run_stage_measured(pipe, img2img, index, size, strength, carried: list, options, common, split_rows,
                        make_image):
    device = pipe.unet.device
    start = time.perf_counter()
    with PeakMemory(device) as meter:
        init_latents = None
        if carried:
            upscaled = upscale2x(carried.pop())  # the previous image is freed here
            init_latents = encode(pipe, upscaled, options, common["generator"])
            del upscaled
        with memory_options_applied(pipe.unet, options, split_rows):
            latents = _denoise(pipe, img2img, index, size, strength, init_latents, common)
        del init_latents
        images = decode(pipe, latents, options)
        del latents
        image = to_pil(images) if make_image else None
    steps = common["num_inference_steps"]
    stage = HighResStage(index, size[0], size[1], strength, steps if strength is None else int(steps * strength),
                         time.perf_counter() - start, _total(meter), meter.peak_bytes, options, image)
    return stage, images


def _total(meter: PeakMemory) -> Optional[int]:
    return None if meter.peak_bytes is None else meter.start_bytes + meter.peak_bytes


def _stage_options(pipe, sizes, strengths, memory, budget, guidance_scale, split_rows) -> List[MemoryOptions]:
    if isinstance(memory, (list, tuple)):
        if len(memory) != len(sizes) or not all(isinstance(m, MemoryOptions) for m in memory):
            raise ValueError(f"generate_highres: memory as a sequence needs one MemoryOptions per stage "
                             f"({len(sizes)}), got {len(memory)} items")
        return list(memory)
    if budget is None:
        return [memory or MemoryOptions()] * len(sizes)
    from .highres_memory import plan_highres_memory

    (height, width), base = sizes[-1], max(sizes[0])
    return plan_highres_memory(pipe, height=height, width=width, budget_bytes=budget, base_size=base,
                               strengths=strengths, guidance_scale=guidance_scale, row_parallel=split_rows)
