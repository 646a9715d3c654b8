"""LinFusion's ultra-high-resolution pipeline: the SDEdit cascade up to 16K, within one GPU's memory.

The official recipe (LinFusion's notebook `ultra_text2image_w_sdedit.ipynb`, SD-1.5): generate
at the base resolution, then repeatedly upscale by 2 and run img2img (SDEdit, Meng et al. 2022)
with decreasing strength, 0.4, 0.3, 0.2, 0.1 of 50 steps: 1024 -> 2048 -> 4096 -> 8192 -> 16384
px on the long side, every stage seeded anew with the same seed (`seed=`). For SD-XL the
notebook `superres_sdxl_low_w_mem.ipynb` runs another pipeline (StableDiffusionXLSuperResPipeline:
DemoFusion-style skip residuals and dilated sampling, cosine_scale_1/2/3 = 3/1/1, gaussian_sigma
0.8, upscale_strength 0.32/0.24/0.16/0.08), which mmfast does not implement: generate_highres
runs the SDEdit cascade on SD-XL too.

    from mmfast.models.linfusion import LinFusion, MemoryOptions, generate_highres
    LinFusion.construct_for(pipe, pretrained=LINFUSION_DIR)
    out = generate_highres(pipe, prompt, height=8192, width=16384, return_stages=True,
                           memory=MemoryOptions(cfg_batch_size=1, token_chunk_size=65536,
                                                ff_chunk_size=65536, vae_tiling="blend"))
    out.image.save("16k.png"); print(out.stages)   # or memory_budget_bytes=80e9: planned per stage

Memory knobs (MemoryOptions, highres_options.py), all exact (equal up to floating-point
summation order) but VAE "blend" tiling: the CFG batch (uncond, cond) run one row at a time;
attn1 (LinFusion) and the feed-forward over token chunks; the VAE encode/decode tiled
(mmfast.models.vae_tiling). `estimate_highres_memory` predicts each stage's peak before
running (see highres_memory.py); with `memory_budget_bytes`, generate_highres picks the
lightest options that fit per stage. When torch.distributed is initialised with more than one
rank, each UNet call is split by latent rows over the ranks (row_parallel.py), exact against
one process.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...memory import PeakMemory
from ...ops._checks import is_integer
from .. import vae_tiling
from .attention import GeneralizedLinearAttention
from .highres_memory import plan_highres_memory
from .highres_options import (DEFAULT_STRENGTHS, MemoryOptions, _check_size, cascade_sizes, memory_options_applied,
                              row_parallel_requested, size_multiple, vae_precision, vae_tiling_kwargs)
from .highres_options import TokenChunkedFeedForward, vae_needs_upcast  # noqa: F401 (re-exported)


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


def decode(pipe, latents: torch.Tensor, options: MemoryOptions, progress=False) -> torch.Tensor:
    """progress: as vae_tiling.decode_latents' (False, True or tqdm settings)."""
    with vae_precision(pipe) as dtype:
        return vae_tiling.decode_latents(pipe.vae, latents.to(dtype), progress=progress,
                                         **vae_tiling_kwargs(options, False, pipe.vae_scale_factor))


def encode(pipe, images: torch.Tensor, options: MemoryOptions, generator, progress=False) -> torch.Tensor:
    with vae_precision(pipe) as dtype:
        latents = vae_tiling.encode_images(pipe.vae, images.to(dtype), generator=generator, progress=progress,
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
                      "token count and will not reach high resolutions (LinFusion.construct_for(pipe, "
                      "pretrained=DIR))", stacklevel=3)


def check_strengths(strengths: Sequence[float], steps: int) -> Tuple[float, ...]:
    """The strengths as floats; ValueError unless each is in (0, 1] and denoises >= 1 of `steps`."""
    strengths = tuple(float(s) for s in strengths)
    if not is_integer(steps) or steps < 1:
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
    reserved = sorted(set(pipeline_kwargs) & {"output_type", "image", "strength", "num_inference_steps"})
    if reserved:
        raise ValueError(f"generate_highres: {', '.join(reserved)} cannot be passed through to the pipeline: the "
                         "cascade sets them per stage (strengths and steps are its own arguments; it returns a "
                         "PIL image)")


def _image_to_image_pipeline(pipe):
    """The img2img pipeline of pipe's modules, with pipe's progress-bar settings (from_pipe
    leaves them behind: the upscaling stages' bars ignored set_progress_bar_config)."""
    from diffusers import AutoPipelineForImage2Image

    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img._progress_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))  # noqa: SLF001
    return img2img


# Taken by diffusers' SD / SD-XL pipelines through **kwargs on purpose (deprecated, still used).
_KWARGS_PIPELINES_USE = frozenset({"callback", "callback_steps"})


def _named_call_parameters(pipeline):
    """The named parameters of the pipeline's __call__: the first in its class's MRO that names
    any (a subclass's or an undecorated wrapper's __call__(self, *args, **kwargs) names none)."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    for cls in type(pipeline).__mro__:
        if "__call__" in vars(cls):
            named = {name for name, parameter in inspect.signature(vars(cls)["__call__"]).parameters.items()
                     if parameter.kind not in variadic} - {"self"}
            if named:
                return named
    return None


def _check_pass_through(pipelines, pipeline_kwargs: dict) -> None:
    """Every pass-through argument must be a parameter of every pipeline the cascade calls: their
    __call__ swallows unknown names (**kwargs), so SD's img2img ignored guidance_rescale silently."""
    for pipeline in pipelines:
        parameters = _named_call_parameters(pipeline)
        if parameters is None:
            continue
        ignored = sorted(name for name in pipeline_kwargs if name not in parameters | _KWARGS_PIPELINES_USE)
        if ignored:
            raise ValueError(f"generate_highres: {', '.join(ignored)} is not a parameter of "
                             f"{type(pipeline).__name__}, which would ignore it; the cascade passes these "
                             "arguments to every stage's pipeline")


def _denoise(pipe, img2img, index, size, strength, init_latents, common: dict):
    height, width = size
    if index == 0:
        return pipe(height=height, width=width, output_type="latent", **common).images
    return img2img(image=init_latents, strength=strength, output_type="latent", **common).images


@torch.no_grad()
def generate_highres(pipe, prompt, *, height: int, width: int, base_size: Optional[int] = None,
                     strengths: Sequence[float] = DEFAULT_STRENGTHS, steps: int = 50,
                     guidance_scale: float = 7.5, negative_prompt=None, generator=None,
                     seed: Optional[int] = None, memory=None, memory_budget_bytes: Optional[int] = None,
                     row_parallel: Optional[bool] = None, progress: bool = True,
                     return_stages: bool = False, **pipeline_kwargs):
    """The SDEdit cascade: text-to-image at the base size, then x2 + img2img per strength.

    Args:
        pipe: a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline (SD-1.5, 2.1, XL),
            LinFusion mounted on its UNet. The img2img stages use
            AutoPipelineForImage2Image.from_pipe(pipe) (the same modules).
        prompt, negative_prompt, guidance_scale, generator, **pipeline_kwargs: passed to every
            stage's pipeline call (diffusers semantics); one generator runs on through the stages.
        seed: instead of generator, every stage draws from a CPU generator seeded anew with
            seed, as the official notebook's torch.manual_seed(seed) before each stage.
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
        progress: diffusers' progress bar per stage, labelled with the stage and its size, and
            with vae_tiling="exact" one over the VAE's layers; both take the pipeline's
            set_progress_bar_config settings (disable=True there turns them off).
        return_stages: return HighResOutput (image + per-stage HighResStage with time, peak
            memory and image) instead of the image.

    Returns: the final PIL image, or HighResOutput.
    Raises: ValueError for sizes that do not halve into multiples of size_multiple(pipe), for
        a base_size that does not match, for memory and memory_budget_bytes together, or when no
        options fit the budget; TypeError for a pipeline without unet/vae/scheduler.
    """
    _check_pipeline(pipe)
    _check_one_image(prompt, pipeline_kwargs)
    _check_size(height, width)
    if memory is not None and memory_budget_bytes is not None:
        raise ValueError("generate_highres: pass memory (fixed options) or memory_budget_bytes (planned), not both")
    if seed is not None and (generator is not None or not is_integer(seed)):
        raise ValueError(f"generate_highres: seed must be an int and comes instead of generator, got seed={seed!r} "
                         f"and generator={generator!r}")
    strengths = check_strengths(strengths, steps)
    sizes = cascade_sizes(height, width, len(strengths), base_size, size_multiple(pipe))
    split_rows = row_parallel_requested(row_parallel)
    plans = _stage_options(pipe, sizes, strengths, memory, memory_budget_bytes, guidance_scale, split_rows)
    img2img = _image_to_image_pipeline(pipe) if strengths else None
    _check_pass_through([pipe] + ([img2img] if img2img is not None else []), pipeline_kwargs)
    common = dict(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                  guidance_scale=guidance_scale, generator=generator, **pipeline_kwargs)
    stages, carried = [], []  # carried: the previous stage's image, handed over (not held here)
    for index, (size, strength) in enumerate(zip(sizes, (None,) + strengths)):
        if seed is not None:
            common["generator"] = torch.Generator().manual_seed(int(seed))
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
    pipeline = pipe if index == 0 else img2img
    with _progress_bars(pipeline, label, progress):
        # the VAE's bar (exact tiling) with the pipeline's bar settings, or none
        settings = {k: v for k, v in pipeline._progress_bar_config.items() if k not in ("desc", "disable")}  # noqa: SLF001
        vae_progress = (settings or True) if progress and not pipeline._progress_bar_config.get("disable") else False
        return _run_stage_measured(pipe, img2img, index, size, strength, carried, options, common, split_rows,
                                   make_image, vae_progress)


@contextlib.contextmanager
def _progress_bars(pipeline, label: str, progress: bool):
    """diffusers' progress bar labelled with the stage; the pipeline's own settings put back after
    (a disable=True set there stays: progress=False can only add one)."""
    saved = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(**{**saved, "desc": label, "disable": saved.get("disable", False) or not progress})
    try:
        yield
    finally:
        pipeline._progress_bar_config = saved  # noqa: SLF001 (diffusers keeps it there)


def _run_stage_measured(pipe, img2img, index, size, strength, carried: list, options, common, split_rows,
                        make_image, vae_progress: bool):
    device = pipe.unet.device
    start = time.perf_counter()
    with PeakMemory(device) as meter:
        init_latents = None
        if carried:
            upscaled = upscale2x(carried.pop())  # the previous image is freed here
            init_latents = encode(pipe, upscaled, options, common["generator"], vae_progress)
            del upscaled
        with memory_options_applied(pipe.unet, options, split_rows):
            latents = _denoise(pipe, img2img, index, size, strength, init_latents, common)
        del init_latents
        images = decode(pipe, latents, options, vae_progress)
        del latents
        image = to_pil(images) if make_image else None
    steps = common["num_inference_steps"]
    stage = HighResStage(index, size[0], size[1], strength, steps if strength is None else int(steps * strength),
                         time.perf_counter() - start, _total(meter), meter.peak_bytes, options, image)
    return stage, images


def _total(meter: PeakMemory) -> Optional[int]:
    return None if meter.peak_bytes is None else meter.start_bytes + meter.peak_bytes


def _stage_options(pipe, sizes, strengths, memory, budget, guidance_scale, split_rows) -> List[MemoryOptions]:
    if memory is not None and not isinstance(memory, (MemoryOptions, list, tuple)):
        hint = " (MemoryOptions(**options))" if isinstance(memory, dict) else ""
        raise TypeError(f"generate_highres: memory must be a MemoryOptions{hint}, one per stage in a list, or "
                        f"None; got {type(memory).__name__}")
    if isinstance(memory, (list, tuple)):
        if len(memory) != len(sizes) or not all(isinstance(m, MemoryOptions) for m in memory):
            raise ValueError(f"generate_highres: memory as a sequence needs one MemoryOptions per stage "
                             f"({len(sizes)}), got {len(memory)} items")
        return list(memory)
    if budget is None:
        return [memory or MemoryOptions()] * len(sizes)
    (height, width), base = sizes[-1], max(sizes[0])
    return plan_highres_memory(pipe, height=height, width=width, budget_bytes=budget, base_size=base,
                               strengths=strengths, guidance_scale=guidance_scale, row_parallel=split_rows)
