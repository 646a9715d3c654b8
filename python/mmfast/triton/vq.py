"""The Triton twins of the VQ ops: torch.ops.mmfast_triton.vq_quantize and vq_dequantize, with
the schemas, checks, fake kernels and autograd of the native ops (python/mmfast/ops/vq.py).
The kernels and their design are in vq_kernels.py."""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ..ops.vq import check_dequantize, check_quantize, register_fakes_and_autograd
from . import vq_kernels as kernels
from ._common import (INTERPRET, autotuned, check_int32_extent, check_runnable, device_guard, device_sm_count,
                      last_dim_unit)

# Rows x codes per program of the search: 64 x 64, slices of at most 32 dims. On sm_90 (scripts/
# triton_report.py --kernels vq, benchmarks/results/2026-12-02-triton-sm90-vq.md) 128 x 128 or
# 128 x 64 tiles spill at D = 256 in every launch config, and 64-dim slices hold the fp16 / bf16
# kernel at 249-255 registers (32: 128, two blocks per SM).
_BLOCK_N, _BLOCK_K, _MAX_BLOCK_D = 64, 64, 32
# Launch configs (num_warps, num_stages) of the search: FIXED_LAUNCH under the interpreter and
# with MMFAST_TRITON_AUTOTUNE=0, else the faster of the sweep, timed on the first call per D, K
# and dtype. The sweep holds the configs without spills at D = 8 and 256 in every dtype; 4 warps
# spill in fp32, and 3 stages at D = 8 in fp32 (for fp16 / bf16 Triton does not pipeline the
# slice loop: the stages compile alike). N enters the key as a power-of-two bucket: one image's
# 256-1024 vectors and a training batch's 65K fill the GPU differently, but a new N within a
# bucket must not re-time the sweep.
FIXED_LAUNCH = (8, 2)
LAUNCH_SWEEP = [(8, 2), (8, 4)]
_search_kernel = autotuned(kernels.search_kernel, FIXED_LAUNCH, LAUNCH_SWEEP, ["D", "K", "N_BUCKET"])
# The integer view a lookup copies, and the bits of a quiet NaN in each float dtype.
_RAW_BITS = {torch.float32: (torch.int32, 0x7FC00000), torch.float16: (torch.int16, 0x7E00),
             torch.bfloat16: (torch.int16, 0x7FC0), torch.float64: (torch.int64, 0x7FF8000000000000)}


def search_meta(d: int, dtype: torch.dtype) -> dict:
    """search_kernel's constexprs for D and the input dtype (the launch and
    scripts/triton_report.py share them)."""
    half = dtype in (torch.float16, torch.bfloat16)
    return dict(HALF=half and not (INTERPRET and dtype == torch.bfloat16), BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
                BLOCK_D=min(_MAX_BLOCK_D, max(16, triton.next_power_of_2(d))))


# Code splits of the search; None: about 4 programs per SM on the GPU, 1 under the interpreter.
# The tests set it to exercise the merge of the splits on the CPU.
FORCE_SPLITS: Optional[int] = None


def _splits(row_tiles: int, code_tiles: int, device: torch.device) -> int:
    """Code splits: about 4 programs per SM (1 under the interpreter), at most one per code tile."""
    if FORCE_SPLITS is not None:
        return max(1, min(code_tiles, FORCE_SPLITS))
    if device.type != "cuda":
        return 1
    return max(1, min(code_tiles, triton.cdiv(4 * device_sm_count(device), row_tiles)))


def _finish(z: Tensor, best: Tensor, code: Tensor, codes: int):
    """The splits in order (strictly smaller wins: argmin returns the first minimum; a split
    without a finite score holds inf, never NaN), ||z||^2, and the rules of mmfast/vq.h. One
    reduction, not a loop over the splits: on the GPU there can be hundreds."""
    winner = best.argmin(0, keepdim=True)
    score, index = best.gather(0, winner)[0], code.gather(0, winner)[0]
    z_sqnorm = z.float().pow(2).sum(-1)
    finite = z_sqnorm.isfinite()
    none = index >= codes  # no finite score
    index = torch.where(finite & ~none, index, torch.zeros_like(index))
    distance = torch.where(finite, torch.where(none, torch.full_like(score, float("inf")), score + z_sqnorm),
                           z_sqnorm).clamp_min(0)
    return index, distance


@torch.library.custom_op("mmfast_triton::vq_quantize", mutates_args=())
def vq_quantize(z: Tensor, codebook: Tensor, codebook_sqnorm: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(distance, indices), the order of the native op."""
    check_quantize(z, codebook, codebook_sqnorm)
    if z.dim() != 2:
        raise ValueError(f"vq_quantize: the op takes z as (N, D), got shape {tuple(z.shape)}")
    check_runnable("vq_quantize", z, codebook)
    z, codebook = last_dim_unit(z), codebook.contiguous()
    n, (k, d) = z.shape[0], codebook.shape
    check_int32_extent("vq_quantize", "rows of z and codes", max(n, k))
    if n == 0:
        return z.new_empty((0,), dtype=torch.float32), z.new_empty((0,), dtype=torch.int64)
    sqnorm = codebook_sqnorm.contiguous() if codebook_sqnorm is not None else codebook.float().pow(2).sum(-1)
    meta = search_meta(d, z.dtype)
    row_tiles, code_tiles = triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"])
    splits = _splits(row_tiles, code_tiles, z.device)
    with device_guard(z):
        best = z.new_empty((splits, n), dtype=torch.float32)
        code = z.new_empty((splits, n), dtype=torch.int64)
        _search_kernel[(row_tiles * splits,)](
            z, codebook, sqnorm, best, code, n, k, d, z.stride(0) if n > 1 else d, splits, code_tiles,
            triton.next_power_of_2(n), **meta)
        indices, distance = _finish(z, best, code, k)
        return distance, indices


@torch.library.custom_op("mmfast_triton::vq_dequantize", mutates_args=())
def vq_dequantize(indices: Tensor, codebook: Tensor, channels_first: bool) -> Tensor:
    check_dequantize(indices, codebook, channels_first)
    check_runnable("vq_dequantize", codebook)
    indices, codebook = indices.contiguous(), codebook.contiguous()
    k, d = codebook.shape
    shape = (indices.shape[0], d, *indices.shape[1:]) if channels_first else (*indices.shape, d)
    bits, nan = _RAW_BITS[codebook.dtype]
    with device_guard(codebook):
        out = codebook.new_empty(shape)
        count = indices.numel()
        if count:
            block = 1024
            plane = indices.shape[1] * indices.shape[2] if channels_first else 1
            kernels.lookup_kernel[(triton.cdiv(count * d, block),)](
                indices, codebook.view(bits), out.view(bits), count * d, k, d, plane, d * plane, nan,
                CHANNELS_FIRST=channels_first, BLOCK=block)
    return out


register_fakes_and_autograd("mmfast_triton")
