"""Memory model of the high-resolution cascade: each stage's peak, predicted before running.

A stage holds the weights and the previous stage's image, then runs three phases: the VAE
encode of the 2x-upscaled image (not in the base stage), the denoising loop (one UNet call at
a time) and the VAE decode. Each phase's transient memory is predicted by running that very
module call on fake tensors (mmfast.memory.traced_peak_bytes: no memory, no FLOPs, the same
code path with the same MemoryOptions applied), and the tensors the pipeline keeps around
each phase (images, latents) are added. It sees PyTorch's tensors only: cuDNN/oneDNN
workspaces and allocator rounding are not in it, nor is a ControlNet. Under a row-parallel
split it predicts the whole image's UNet call, an upper bound for each rank's band.

    stages = estimate_highres_memory(pipe, height=8192, width=16384, options=MemoryOptions(...))
    for s in stages: print(s.height, s.width, s.peak_bytes / 2**30)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ...memory import traced_peak_bytes
from .. import vae_tiling
from . import highres
from .highres import DEFAULT_STRENGTHS, MemoryOptions, cascade_sizes, memory_options_applied, size_multiple

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
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in list(component.parameters()) + list(component.buffers()):
                if tensor.device == device:
                    total += tensor.numel() * tensor.element_size()
    return total


def _unet_call(unet, rows: int, latent_h: int, latent_w: int):
    """A UNet call shaped like the pipeline's, its inputs created inside the trace."""
    config, device, dtype = unet.config, unet.device, unet.dtype

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


def estimate_stage_memory(pipe, *, index: int, height: int, width: int, options: MemoryOptions = MemoryOptions(),
                          guidance_scale: float = 7.5, batch_size: int = 1) -> StageMemory:
    """The predicted peak of stage `index` (0: text-to-image) at height x width px."""
    unet, vae, device = pipe.unet, pipe.vae, pipe.unet.device
    factor = pipe.vae_scale_factor
    latent_h, latent_w = height // factor, width // factor
    latent_bytes = _nbytes((batch_size, unet.config.in_channels, latent_h, latent_w), unet.dtype)
    # An upcast VAE (SD-XL in fp16) is traced in its own dtype (a real upcast would allocate)
    # and scaled: its activations are twice as wide, and its fp32 weights replace the fp16 ones.
    upcast = 2 if highres.vae_needs_upcast(vae) else 1
    image_bytes = upcast * _nbytes((batch_size, 3, height, width), vae.dtype)
    encode_bytes = 0
    if index > 0:
        def encode():
            images = torch.empty(batch_size, 3, height, width, device=device, dtype=vae.dtype)
            return vae_tiling.encode_images(vae, images, **highres.vae_tiling_kwargs(options, True, factor))
        # the trace counts the upscaled image; the upscale itself holds 2 more copies
        encode_bytes = max(upcast * traced_peak_bytes(encode, device=device), 3 * image_bytes)

    def decode():
        latents = torch.empty(batch_size, unet.config.in_channels, latent_h, latent_w, device=device, dtype=vae.dtype)
        return vae_tiling.decode_latents(vae, latents, **highres.vae_tiling_kwargs(options, False, factor))
    # the decoded image then gets a copy for the stage's PIL image and one for the conversion
    decode_bytes = max(upcast * traced_peak_bytes(decode, device=device), 3 * image_bytes) + latent_bytes
    if upcast > 1:  # the fp32 copy of the weights, less the fp16 ones it replaces
        weights = sum(p.numel() for p in vae.parameters()) * 2
        encode_bytes, decode_bytes = encode_bytes + (weights if index > 0 else 0), decode_bytes + weights
    rows = batch_size * (2 if guidance_scale > 1 else 1)
    with memory_options_applied(unet, options):
        unet_bytes = traced_peak_bytes(_unet_call(unet, rows, latent_h, latent_w), device=device)
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


def plan_memory_options(pipe, *, height: int, width: int, budget_bytes: int, stage: int = 1,
                        guidance_scale: float = 7.5, ladder: Sequence[MemoryOptions] = MEMORY_LADDER) -> MemoryOptions:
    """The first options of `ladder` whose predicted stage peak fits budget_bytes.

    Raises ValueError listing every rung's prediction when none fits.
    """
    predictions = []
    for options in ladder:
        memory = estimate_stage_memory(pipe, index=stage, height=height, width=width, options=options,
                                       guidance_scale=guidance_scale)
        if memory.peak_bytes <= budget_bytes:
            return options
        predictions.append(f"  {options}: {memory.peak_bytes / 2**30:.2f} GiB")
    raise ValueError(f"generate_highres: no memory options fit {budget_bytes / 2**30:.2f} GiB at stage {stage} "
                     f"({width}x{height} px); predicted peaks:\n" + "\n".join(predictions))
