"""Liquid (arXiv 2412.04332, FoundationVision/Liquid) on mmfast: the image tokenizer.

Liquid tokenizes images with Chameleon's VQGAN (taming-transformers' VQModel, 8192 codes of 256
dims, 16x downsampling: a 512 x 512 image is 32 x 32 = 1024 codes) and feeds code c to its LLM as
token id 256000 + c.

    from mmfast.models.liquid import VQGAN, codes_to_token_ids, preprocess, postprocess
    model = VQGAN.from_pretrained("/path/to/vqgan.safetensors")      # a local file
    codes = model.encode(preprocess(pil_image))                      # (1, 32, 32) int64
    token_ids = codes_to_token_ids(codes.flatten(1))                 # (1, 1024) in [256000, 264192)
    pixels = postprocess(model.decode(codes))                        # (1, 512, 512, 3) uint8
"""
from .taming import VQGANConfig
from .tokens import (LIQUID_IMAGE_TOKEN_OFFSET, LIQUID_NUM_IMAGE_CODES, codes_to_token_ids, is_image_token,
                     token_ids_to_codes)
from .vqgan import VQGAN, VQGANCheckpointError, load_taming_state_dict, postprocess, preprocess

__all__ = [
    "LIQUID_IMAGE_TOKEN_OFFSET",
    "LIQUID_NUM_IMAGE_CODES",
    "VQGAN",
    "VQGANCheckpointError",
    "VQGANConfig",
    "codes_to_token_ids",
    "is_image_token",
    "load_taming_state_dict",
    "postprocess",
    "preprocess",
    "token_ids_to_codes",
]
