"""torch.autocast for mmfast's ops: the casts torch applies to its own ops of the same kind,
done in the public wrappers (so every backend, the reference included, sees one dtype)."""
from __future__ import annotations

from typing import Optional

import torch

_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves fp64 alone, as torch does
_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_inputs(policy, device: torch.device, *tensors: Optional[torch.Tensor]):
    """`tensors` as torch.autocast would give them to an op of the same kind, inside an enabled
    autocast region of their device type; unchanged outside one. policy "lower": to the region's
    dtype (torch's conv2d / linear / matmul / SDPA); "fp32": to float32 (torch's CUDA rule for
    group_norm and cdist, on both devices: CPU autocast leaves group_norm in the input's dtype, but
    a bf16 x could then not meet an fp32 weight); a torch.dtype: to that dtype (a static KV cache's:
    the new tokens and queries follow the cache, which keeps the dtype it was made with). Only fp32
    / fp16 / bf16 tensors on that device type are cast, as torch casts; a weight is cast on every
    call (torch's own cast cache is not reachable from Python)."""
    if not torch._C._is_any_autocast_enabled():  # the common case, in one C call (0.3 us; the ops run per token)
        return tensors
    device_type = device.type
    if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return tensors
    if isinstance(policy, torch.dtype):
        dtype = policy
        if dtype not in _ELIGIBLE:  # an fp64 cache: nothing to follow (autocast leaves fp64 alone)
            return tensors
    else:
        dtype = torch.get_autocast_dtype(device_type) if policy == "lower" else torch.float32
    return tuple(t.to(dtype) if t is not None and t.dtype in _ELIGIBLE and t.device.type == device_type else t
                 for t in tensors)
