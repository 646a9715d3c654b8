"""Linear attention for DiffDIS at high resolution (LinFusion-style, on mmfast.ops.linear_attention).

At 1024 px the five attn1 layers of the top UNet level (128^2 = 16,384 tokens) take 38% of the
UNet's FLOPs (all 16 attn1 layers' QK^T and AV: 42%), and their share grows quadratically with
the side (all attn1 layers: 74% at 2048 px). Replacing them by LinFusion's
GeneralizedLinearAttention makes them linear in the token count.

This is NOT weight-compatible: DiffDIS fine-tuned every attn1, and linear attention computes
another function, so the swapped layers need distillation against the softmax UNet (the teacher)
before their masks are DiffDIS's: use mmfast.models.linfusion.LinFusionDistiller with
DiffDISPipeline.prepare_unet_inputs (see the README), then LinFusion.save_pretrained, and pass
that directory as `pretrained` later.
"""
from __future__ import annotations

import warnings
from typing import List, Optional

from torch import nn

from ..linfusion import LinFusion, unet_attn1_specs


def top_level_attn1_names(unet: nn.Module, levels: int = 1) -> List[str]:
    """Names of the attn1 layers of the `levels` highest-resolution UNet levels (down and up path).

    levels=1: down_blocks.0 and the last up block (128^2 tokens at 1024 px: 5 layers in SD-2.1).
    """
    every = [spec.module_name for spec in unet_attn1_specs(unet)]
    usable = 0  # the top levels that have self-attention (SD-2.1: 3 of 4; its lowest level has none)
    while usable < len(unet.down_blocks) and any(name.startswith(f"down_blocks.{usable}.") for name in every):
        usable += 1
    if isinstance(levels, bool) or not hasattr(type(levels), "__index__"):
        raise TypeError(f"DiffDIS linear attention: levels must be an int, got {levels!r}")
    if not 1 <= levels <= usable:
        raise ValueError(f"DiffDIS linear attention: levels must be in [1, {usable}] (the top levels with "
                         f"self-attention), got {levels}")
    prefixes = tuple(f"down_blocks.{i}." for i in range(levels))
    prefixes += tuple(f"up_blocks.{len(unet.up_blocks) - 1 - i}." for i in range(levels))
    return [name for name in every if name.startswith(prefixes)]


def mount_linear_attention(unet: nn.Module, levels: int = 1, pretrained: Optional[str] = None) -> LinFusion:
    """Mounts linear attention on the top `levels` levels' attn1 layers; returns the LinFusion.

    pretrained: a local LinFusion directory (save_pretrained of a distilled one) for exactly those
    layers. Without it the modules start from the UNet's own q/k/v/out projections with random
    LinFusion MLPs, and a warning says the outputs are not DiffDIS's until distilled.
    `linfusion.unmount()` puts the softmax layers back.
    """
    names = top_level_attn1_names(unet, levels)
    if pretrained is None:
        warnings.warn("DiffDIS linear attention: the swapped attn1 layers are not distilled yet, so the masks are "
                      "not DiffDIS's; distill them (LinFusionDistiller) or pass pretrained=DIR", stacklevel=2)
        return LinFusion.construct_for(unet, module_names=names, init_from_unet=True, load_pretrained=False)
    linfusion = LinFusion.construct_for(unet, pretrained=pretrained)
    mounted = [spec.module_name for spec in linfusion.specs]
    if sorted(mounted) != sorted(names):
        linfusion.unmount()
        raise ValueError(f"DiffDIS linear attention: {pretrained} holds layers {mounted}, levels={levels} needs {names}")
    return linfusion
