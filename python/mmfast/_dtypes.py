"""Dtype conventions shared by every op family, its checks and its reference."""
from __future__ import annotations

import torch

# Floating-point inputs the kernels take (float64 on the CPU kernels and the reference).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 accumulation for fp64 inputs, fp32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
