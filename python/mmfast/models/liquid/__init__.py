"""Liquid (arXiv 2412.04332, FoundationVision/Liquid) on mmfast: the image tokenizer, the
language model (Llama / Gemma / Gemma-2 with a static KV cache) and its generation loops.

Liquid tokenizes images with Chameleon's VQGAN (taming-transformers' VQModel, 8192 codes of 256
dims, 16x downsampling: a 512 x 512 image is 32 x 32 = 1024 codes) and feeds code c to its LLM as
token id 256000 + c.

    from mmfast.models.liquid import VQGAN, codes_to_token_ids, preprocess, postprocess
    model = VQGAN.from_pretrained("/path/to/vqgan.safetensors")      # a local file
    codes = model.encode(preprocess(pil_image))                      # (1, 32, 32) int64
    token_ids = codes_to_token_ids(codes.flatten(1))                 # (1, 1024) in [256000, 264192)
    pixels = postprocess(model.decode(codes))                        # (1, 512, 512, 3) uint8

    lm = LiquidLM.from_pretrained("/path/to/Liquid_V1_7B", dtype=torch.bfloat16, device="cuda")
    codes = generate_images(lm, prompt_ids, uncond_ids=uncond_ids, num_images=4, seed=0)  # (4, 32, 32)
"""
from .generate import (LIQUID_PROMPT_SUFFIX, LIQUID_UNCONDITIONAL_PROMPT, DecodeStep, check_image_generation,
                       generate_images, generate_text)
from .lm import LiquidLM, LiquidLMCheckpointError, LiquidLMConfig
from .taming import VQGANConfig
from .tokens import (LIQUID_IMAGE_TOKEN_OFFSET, LIQUID_NUM_IMAGE_CODES, codes_to_token_ids, is_image_token,
                     token_ids_to_codes)
from .vqgan import VQGAN, VQGANCheckpointError, load_taming_state_dict, postprocess, preprocess

__all__ = [
    "DecodeStep",
    "LIQUID_IMAGE_TOKEN_OFFSET",
    "LIQUID_NUM_IMAGE_CODES",
    "LIQUID_PROMPT_SUFFIX",
    "LIQUID_UNCONDITIONAL_PROMPT",
    "LiquidLM",
    "LiquidLMCheckpointError",
    "LiquidLMConfig",
    "VQGAN",
    "VQGANCheckpointError",
    "VQGANConfig",
    "codes_to_token_ids",
    "check_image_generation",
    "generate_images",
    "generate_text",
    "is_image_token",
    "load_taming_state_dict",
    "postprocess",
    "preprocess",
    "token_ids_to_codes",
]
