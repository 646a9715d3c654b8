"""Liquid's image tokens in the LLM vocabulary: image code c is LLM token id offset + c.

Liquid (FoundationVision/Liquid) appends the VQGAN's 8192 codes after the text vocabulary:
liquid/train/train.py adds `len(tokenizer)` (256000 for the released Gemma-7B model) to each code
and liquid/expand_vocabulary.py resizes the embeddings to 256000 + 8192 = 264192 rows. Generation
maps sampled ids back with `id - len(tokenizer)` and then clamps to [0, 8191]
(evaluation/inference_t2i.py); `token_ids_to_codes(..., clamp=True)` reproduces that clamp, the
default raises instead.

Every function works on integer tensors of any shape and device (lists and ints are converted);
range checks read the min and max (a host synchronisation on GPU tensors).
"""
from __future__ import annotations

import torch

__all__ = ["LIQUID_IMAGE_TOKEN_OFFSET", "LIQUID_NUM_IMAGE_CODES", "codes_to_token_ids", "token_ids_to_codes",
           "is_image_token"]

LIQUID_IMAGE_TOKEN_OFFSET = 256000  # len(tokenizer) of Liquid's Gemma release
LIQUID_NUM_IMAGE_CODES = 8192  # Chameleon's VQGAN codebook


def _integer_tensor(name: str, values) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(values)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer values, got {values.dtype}")
    return values.long()


def _check_sizes(name: str, offset: int, num_codes: int) -> None:
    if int(offset) < 0 or int(num_codes) < 1:
        raise ValueError(f"{name}: offset must be >= 0 and num_codes >= 1, got offset={offset}, num_codes={num_codes}")


def _check_range(name: str, what: str, values: torch.Tensor, low: int, high: int) -> None:
    """ValueError when some value lies outside [low, high)."""
    if values.numel() == 0:
        return
    smallest, largest = int(values.min()), int(values.max())
    if smallest < low or largest >= high:
        bad = smallest if smallest < low else largest
        raise ValueError(f"{name}: {what} {bad} is outside [{low}, {high})")


def codes_to_token_ids(codes, offset: int = LIQUID_IMAGE_TOKEN_OFFSET,
                       num_codes: int = LIQUID_NUM_IMAGE_CODES) -> torch.Tensor:
    """LLM token ids of image codes: codes + offset, int64, same shape and device.

    codes: integer tensor (e.g. VQGAN.encode's (B, 32, 32), flatten it for a token sequence).
    Raises TypeError for non-integer codes, ValueError for a code outside [0, num_codes).
    """
    name = "codes_to_token_ids"
    _check_sizes(name, offset, num_codes)
    codes = _integer_tensor(name, codes)
    _check_range(name, "image code", codes, 0, int(num_codes))
    return codes + int(offset)


def token_ids_to_codes(token_ids, offset: int = LIQUID_IMAGE_TOKEN_OFFSET,
                       num_codes: int = LIQUID_NUM_IMAGE_CODES, clamp: bool = False) -> torch.Tensor:
    """Image codes of LLM token ids: token_ids - offset, int64, same shape and device.

    Raises TypeError for non-integer ids and ValueError for an id outside
    [offset, offset + num_codes) (a text token where an image token was expected); with
    clamp=True such ids are clamped to [0, num_codes - 1] instead, as Liquid's generation does.
    """
    name = "token_ids_to_codes"
    _check_sizes(name, offset, num_codes)
    token_ids = _integer_tensor(name, token_ids)
    if clamp:
        return (token_ids - int(offset)).clamp_(0, int(num_codes) - 1)
    _check_range(name, "token id", token_ids, int(offset), int(offset) + int(num_codes))
    return token_ids - int(offset)


def is_image_token(token_ids, offset: int = LIQUID_IMAGE_TOKEN_OFFSET,
                   num_codes: int = LIQUID_NUM_IMAGE_CODES) -> torch.Tensor:
    """Bool mask of the ids in [offset, offset + num_codes), same shape and device as token_ids."""
    name = "is_image_token"
    _check_sizes(name, offset, num_codes)
    token_ids = _integer_tensor(name, token_ids)
    return (token_ids >= int(offset)) & (token_ids < int(offset) + int(num_codes))
