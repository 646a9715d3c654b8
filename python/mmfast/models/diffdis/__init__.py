"""DiffDIS (arXiv 2410.10105) on mmfast: one-step diffusion segmentation on stock diffusers.

    from mmfast.models.diffdis import DiffDISPipeline
    pipe = DiffDISPipeline.from_pretrained("/path/to/diffdis")      # local qianyu1217/diffdis copy
    out = pipe.segment(image, dtype=torch.bfloat16, mask_only=True)
    out.masks[0]                                                     # (H, W) float32 in [0, 1]
"""
from .linear_attention import mount_linear_attention, top_level_attn1_names
from .pipeline import (DiffDISOutput, DiffDISPipeline, UNetInputs, as_rgb_images, encode_empty_prompt,
                       one_step_x0, resize_input)
from .unet import DBIATransformerBlock, DiffDISUNet, batch_discriminative_embedding, swap_halves

__all__ = [
    "DBIATransformerBlock",
    "DiffDISOutput",
    "DiffDISPipeline",
    "DiffDISUNet",
    "UNetInputs",
    "as_rgb_images",
    "batch_discriminative_embedding",
    "encode_empty_prompt",
    "mount_linear_attention",
    "one_step_x0",
    "resize_input",
    "swap_halves",
    "top_level_attn1_names",
]
