"""Memory model of the high-resolution cascade: each stage's peak, predicted before running.

A stage holds the weights and the previous stage's image, then runs three phases: the VAE
encode of the 2x-upscaled image (not in the base stage), the denoising loop (one UNet call at
a time) and the VAE decode. Each phase's transient memory is predicted by running that very
module call on fake tensors (mmfast.memory.traced_peak_bytes: no memory, no FLOPs, the same
code path with the same MemoryOptions applied), and the tensors the pipeline keeps around
each phase (images, latents) are added. It sees PyTorch's tensors only: cuDNN/oneDNN
workspaces and allocator rounding are not in it, nor is a ControlNet. Under a row-parallel
split it predicts the whole image's UNet call, an upper bound for each rank's band.

A pipeline on the meta device (built under accelerate.init_empty_weights: no weights loaded,
a plan in seconds) is traced as on the CPU, whose SDPA is fused like CUDA's; on meta itself
SDPA would take its math path and hold every N x N score matrix.

    stages = estimate_highres_memory(pipe, height=8192, width=16384, options=MemoryOptions(...))
    for s in stages: print(s.height, s.width, s.peak_bytes / 2**30)
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence

import torch

from ...memory import traced_peak_bytes
from .._modules import offload_hooked
from .. import vae_tiling
from .highres_options import (DEFAULT_STRENGTHS, MemoryOptions, cascade_sizes, memory_options_applied, size_multiple,
                              vae_needs_upcast, vae_tiling_kwargs)

# Lightest first: generate_highres(memory_budget_bytes=...) takes the first that fits a stage.
MEMORY_LADDER = (
    MemoryOptions(),
    MemoryOptions(cfg_batch_size=1),
    MemoryOptions(cfg_batch_size=1, token_chunk_size=65536, ff_chunk_size=65536),
    MemoryOptions(cfg_batch_size=1, token_chunk_size=65536, ff_chunk_size=65536, vae_tiling="blend",
                  vae_tile_size=128),
    MemoryOptions(cfg_batch_size=1, token_chunk_size=16384, ff_chunk_size=16384, vae_tiling="blend",
                  vae_tile_size=64),
)
TEXT_TOKENS = 77  # CLIP's context length: the cross-attention keys


@dataclass
class StageMemory:
    """Predicted bytes of one stage on the pipeline's device."""

    index: int
    height: int
    width: int
    weights_bytes: int   # every module of the pipeline on the device
    carried_bytes: int   # the previous stage's image, held when the stage starts
    encode_bytes: int    # VAE encode phase (0 in the base stage)
    denoise_bytes: int   # one UNet call plus the loop's latents
    decode_bytes: int    # VAE decode phase and the conversion to 8 bits

    @property
    def stage_bytes(self) -> int:
        """Above the memory in use when the stage starts (what PeakMemory.peak_bytes measures)."""
        return max(self.encode_bytes, self.denoise_bytes, self.decode_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.carried_bytes + self.stage_bytes


def _module_bytes(pipe, device) -> int:
    """Bytes of the pipeline's weights on `device` and of those not loaded yet (meta: they go to
    the device); on a meta pipeline all of them (its buffers may stay on the CPU until it is
    loaded). Components kept elsewhere on purpose (CPU offload) are not counted."""
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            offloaded = offload_hooked(component)  # its meta weights are loaded per call, not resident
            for tensor in list(component.parameters()) + list(component.buffers()):
                if tensor.device == device or (tensor.is_meta and not offloaded) or device.type == "meta":
                    total += tensor.numel() * tensor.element_size()
    return total


def _trace_device(module) -> torch.device:
    """Where a module's call is traced: its device, the CPU for a meta module (see the top)."""
    return torch.device("cpu") if module.device.type == "meta" else module.device


def _traced_call_bytes(module, run) -> int:
    """traced_peak_bytes of run() on the module's trace device, its meta weights stood in for."""
    device = _trace_device(module)
    return traced_peak_bytes(run, device=device, materialize=[module] if module.device.type == "meta" else [])


def _unet_call(unet, rows: int, latent_h: int, latent_w: int):
    """A UNet call shaped like the pipeline's, its inputs created inside the trace."""
    config, device, dtype = unet.config, _trace_device(unet), unet.dtype

    def call():
        sample = torch.empty(rows, config.in_channels, latent_h, latent_w, device=device, dtype=dtype)
        text = torch.empty(rows, TEXT_TOKENS, config.cross_attention_dim, device=device, dtype=dtype)
        timestep = torch.full((), 500, device=device)
        return unet(sample, timestep, text, added_cond_kwargs=_added_conditions(config, rows, device, dtype))
    return call


def _added_conditions(config, rows, device, dtype) -> Optional[dict]:
    if config.addition_embed_type != "text_time":
        return None
    time_dims = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {"text_embeds": torch.empty(rows, time_dims, device=device, dtype=dtype),
            "time_ids": torch.empty(rows, 6, device=device, dtype=dtype)}


def _nbytes(shape, dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=dtype).element_size()


def _vae_pass_bytes(vae, options, encode: bool, batch: int, height: int, width: int, factor: int) -> int:
    """Peak bytes of one VAE encode (image -> latents) or decode, its input created in the trace."""
    kwargs = vae_tiling_kwargs(options, encode, factor)
    if options.vae_tiling == "blend":
        return _blend_pass_bytes(vae, kwargs, encode, batch, height, width, factor)
    shape = (batch, 3, height, width) if encode else (batch, vae.config.latent_channels, height // factor,
                                                       width // factor)

    def run():
        x = torch.empty(shape, device=_trace_device(vae), dtype=vae.dtype)
        if encode:
            return vae_tiling.encode_images(vae, x, **kwargs)
        return vae_tiling.decode_latents(vae, x, **kwargs)
    return _traced_call_bytes(vae, run)


def _blend_pass_bytes(vae, kwargs, encode: bool, batch: int, height: int, width: int, factor: int) -> int:
    """diffusers' blended tiling, from one traced tile: the tiles are independent, and every
    tile's output is kept until the blend (then a blended row copy and the concatenated result).
    Tracing one tile instead of hundreds keeps a 16K plan within seconds."""
    tile = kwargs.get("tile_size", vae_tiling.default_tile_size(encode))  # input px (image / latent)
    overlap = kwargs.get("tile_overlap", vae_tiling.default_overlap(tile, factor if encode else 1))
    rows, cols = (height, width) if encode else (height // factor, width // factor)  # input px
    scale = Fraction(1, factor) if encode else factor  # output px per input px
    pixels = 1 if encode else factor  # image px per input px (what _vae_pass_bytes takes)
    tile_bytes = _vae_pass_bytes(vae, MemoryOptions(), encode, batch, min(tile, rows) * pixels,
                                 min(tile, cols) * pixels, factor)
    out_channels = 2 * vae.config.latent_channels if encode else vae.config.out_channels  # encode keeps moments
    per_pixel = batch * out_channels * torch.empty((), dtype=vae.dtype).element_size()
    step = tile - overlap
    kept = per_pixel * sum(int(min(tile, rows - i) * scale) * int(min(tile, cols - j) * scale)
                           for i in range(0, rows, step) for j in range(0, cols, step))
    output = per_pixel * int(rows * scale) * int(cols * scale)
    inputs = _nbytes((batch, 3 if encode else vae.config.latent_channels, rows, cols), vae.dtype)
    return inputs + max(kept + tile_bytes, kept + 2 * output)


def _memoized(memo: Optional[dict], key: tuple, compute):
    """Traces are the cost of a prediction; a planner asks for the same phase under many rungs."""
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def estimate_stage_memory(pipe, *, index: int, height: int, width: int, options: MemoryOptions = MemoryOptions(),
                          guidance_scale: float = 7.5, batch_size: int = 1, memo: Optional[dict] = None) -> StageMemory:
    """The predicted peak of stage `index` (0: text-to-image) at height x width px.

    memo: a dict shared by calls on the same pipeline (a plan) to reuse equal phases' traces.
    """
    unet, vae, device = pipe.unet, pipe.vae, pipe.unet.device
    factor = pipe.vae_scale_factor
    latent_h, latent_w = height // factor, width // factor
    latent_bytes = _nbytes((batch_size, unet.config.in_channels, latent_h, latent_w), unet.dtype)
    # An upcast VAE (SD-XL in fp16) is traced in its own dtype (a real upcast would allocate)
    # and scaled: its activations are twice as wide, and its fp32 weights replace the fp16 ones.
    upcast = 2 if vae_needs_upcast(pipe) else 1
    image_bytes = upcast * _nbytes((batch_size, 3, height, width), vae.dtype)
    vae_options = (options.vae_tiling, options.vae_tile_size, options.vae_tile_overlap, options.vae_offload_device)

    def vae_pass(encode: bool) -> int:
        return _memoized(memo, ("vae", encode, batch_size, height, width) + vae_options,
                         lambda: _vae_pass_bytes(vae, options, encode, batch_size, height, width, factor))
    encode_bytes = 0
    if index > 0:  # the upscale holds the upscaled image and 2 more copies
        encode_bytes = max(upcast * vae_pass(True), 3 * image_bytes)
    # the decoded image then gets a copy and an 8-bit copy for the PIL image
    decode_bytes = max(upcast * vae_pass(False), 3 * image_bytes) + latent_bytes
    if upcast > 1:  # the fp32 copy of the weights, less the fp16 ones it replaces
        weights = sum(p.numel() for p in vae.parameters()) * 2
        encode_bytes, decode_bytes = encode_bytes + (weights if index > 0 else 0), decode_bytes + weights
    rows = batch_size * (2 if guidance_scale > 1 else 1)
    def unet_pass() -> int:
        with memory_options_applied(unet, options):
            return _traced_call_bytes(unet, _unet_call(unet, rows, latent_h, latent_w))
    unet_bytes = _memoized(memo, ("unet", rows, latent_h, latent_w, options.cfg_batch_size, options.token_chunk_size,
                                  options.ff_chunk_size), unet_pass)
    # the loop's latents, their initial copy, the CFG input and the noise prediction
    denoise_bytes = unet_bytes + 2 * latent_bytes + 2 * rows * latent_bytes // batch_size
    carried = upcast * _nbytes((batch_size, 3, height // 2, width // 2), vae.dtype) if index > 0 else 0
    return StageMemory(index, height, width, _module_bytes(pipe, device), carried, encode_bytes, denoise_bytes,
                       decode_bytes)


def estimate_highres_memory(pipe, *, height: int, width: int, base_size: Optional[int] = None,
                            strengths: Sequence[float] = DEFAULT_STRENGTHS, options: MemoryOptions = MemoryOptions(),
                            guidance_scale: float = 7.5, batch_size: int = 1) -> List[StageMemory]:
    """StageMemory for every stage generate_highres would run with these arguments."""
    sizes = cascade_sizes(height, width, len(strengths), base_size, size_multiple(pipe))
    return [estimate_stage_memory(pipe, index=index, height=h, width=w, options=options,
                                  guidance_scale=guidance_scale, batch_size=batch_size)
            for index, (h, w) in enumerate(sizes)]


def empty_pipeline(directory: str, torch_dtype: Optional[torch.dtype] = None):
    """A diffusers pipeline from a local directory (model_index.json) with no weights loaded:
    its models built from their configs on the meta device (accelerate.init_empty_weights), so
    that estimate_highres_memory / plan_highres_memory plan a 16K cascade in seconds without
    reading gigabytes. Tokenizers and schedulers load from their (small) files; safety checkers
    and feature extractors are left out. It cannot generate: load the pipeline to run it.

    torch_dtype: the dtype to plan for (the configs' dtype, fp32, when None).
    Raises FileNotFoundError for a directory without model_index.json, ValueError for a
    component class diffusers / transformers do not have.
    """
    import importlib
    import inspect

    import diffusers

    index_path = os.path.join(directory, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"empty_pipeline: {index_path} not found; expected a diffusers pipeline directory "
                                "(e.g. a local copy of stable-diffusion-v1-5/stable-diffusion-v1-5)")
    with open(index_path) as f:
        index = json.load(f)
    pipeline_class = getattr(diffusers, index["_class_name"], None)
    if pipeline_class is None:
        raise ValueError(f"empty_pipeline: diffusers {diffusers.__version__} has no pipeline {index['_class_name']!r}")
    components = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, class_name = value
        if library not in ("diffusers", "transformers") or name in ("safety_checker", "feature_extractor"):
            components[name] = None  # a checker or its image processor: no part of the memory model
            continue
        component_class = getattr(importlib.import_module(library), class_name, None)
        if component_class is None:
            raise ValueError(f"empty_pipeline: {library} has no {class_name} ({index_path}: {name!r})")
        components[name] = _empty_component(component_class, os.path.join(directory, name), torch_dtype)
    accepted = inspect.signature(pipeline_class.__init__).parameters
    if "requires_safety_checker" in accepted:
        components["requires_safety_checker"] = False
    return pipeline_class(**{key: value for key, value in components.items() if key in accepted})


def _empty_component(component_class, folder: str, torch_dtype):
    """A model built from its config on meta (no weights read), or a tokenizer / scheduler loaded."""
    from accelerate import init_empty_weights
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    if issubclass(component_class, ModelMixin):
        with init_empty_weights():
            model = component_class.from_config(component_class.load_config(folder))
    elif issubclass(component_class, PreTrainedModel):
        config = component_class.config_class.from_pretrained(folder)
        with init_empty_weights():
            model = component_class._from_config(config)
        model.tie_weights()  # as from_pretrained does (built empty they are separate: counted twice)
    else:
        return component_class.from_pretrained(folder)
    if torch_dtype is not None:  # as from_pretrained(torch_dtype=...) casts, keeping what it keeps in fp32
        torch.nn.Module.to(model, torch_dtype)  # (ModelMixin.to warns that it is not from_pretrained)
        keep = _kept_in_fp32(model, torch_dtype)
        for name, module in model.named_modules():
            if any(part in keep for part in name.split(".")):
                module.float()
    return model.eval()


def _kept_in_fp32(model, dtype: torch.dtype) -> set:
    """The module names from_pretrained(torch_dtype=dtype) keeps in fp32: diffusers'
    _keep_in_fp32_modules for any dtype but fp32; transformers' for fp16, and its
    _keep_in_fp32_modules_strict for fp16 and bf16."""
    from transformers import PreTrainedModel

    def names(attribute):
        return set(getattr(model, attribute, None) or ())
    if not isinstance(model, PreTrainedModel):
        return names("_keep_in_fp32_modules") if dtype != torch.float32 else set()
    keep = names("_keep_in_fp32_modules_strict") if dtype in (torch.float16, torch.bfloat16) else set()
    return keep | names("_keep_in_fp32_modules") if dtype == torch.float16 else keep


def plan_memory_options(pipe, *, height: int, width: int, budget_bytes: int, stage: int = 1,
                        guidance_scale: float = 7.5, batch_size: int = 1,
                        ladder: Sequence[MemoryOptions] = MEMORY_LADDER, memo: Optional[dict] = None) -> MemoryOptions:
    """The first options of `ladder` whose predicted stage peak fits budget_bytes.

    Raises ValueError listing every rung's prediction when none fits.
    """
    predictions = []
    memo = {} if memo is None else memo
    for options in ladder:
        memory = estimate_stage_memory(pipe, index=stage, height=height, width=width, options=options,
                                       guidance_scale=guidance_scale, batch_size=batch_size, memo=memo)
        if memory.peak_bytes <= budget_bytes:
            return options
        predictions.append(f"  {options}: {_size(memory.peak_bytes)}")
    raise ValueError(f"generate_highres: no memory options fit {_size(budget_bytes)} at stage {stage} "
                     f"({width}x{height} px); predicted peaks:\n" + "\n".join(predictions))


def _size(num_bytes: int) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point (GiB, MiB or KiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes / 2**10:.2f} KiB"


def plan_highres_memory(pipe, *, height: int, width: int, budget_bytes: int, base_size: Optional[int] = None,
                        strengths: Sequence[float] = DEFAULT_STRENGTHS, guidance_scale: float = 7.5,
                        batch_size: int = 1, row_parallel: bool = False) -> List[MemoryOptions]:
    """One MemoryOptions per stage: what generate_highres(memory_budget_bytes=...) runs with.

    Plan once and pass the list as generate_highres(memory=...) to keep planning out of the run.
    row_parallel: leave out the rungs with token chunks (a row split runs attention whole per band).
    """
    # A row split runs attention whole on each band: its rungs keep everything but token chunks.
    ladder = [dataclasses.replace(rung, token_chunk_size=None) if row_parallel else rung for rung in MEMORY_LADDER]
    sizes = cascade_sizes(height, width, len(strengths), base_size, size_multiple(pipe))
    memo: dict = {}
    return [plan_memory_options(pipe, height=h, width=w, budget_bytes=budget_bytes, stage=index,
                                guidance_scale=guidance_scale, batch_size=batch_size, ladder=ladder, memo=memo)
            for index, (h, w) in enumerate(sizes)]
