"""The Triton twins of the masked-channel (pruned-expert) ops: torch.ops.mmfast_triton.masked_conv2d,
masked_linear and masked_group_norm, with the schemas, checks, fake kernels and autograd of the
native ops (python/mmfast/ops/pruned.py). The kernels and their design are in pruned_kernels.py.

Like the CUDA kernels, these never synchronise with the host: a sample whose code is outside
[0, K) comes out NaN (its whole output), on the GPU and under the interpreter alike (the
native CPU op and the reference raise IndexError instead). No float64 kernels (TypeError, as
every Triton family): the fp64 path is the native CPU op or the reference. Gradients are the
shared PyTorch autograd of ops/pruned.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ..ops.pruned import (check_masked_conv2d, check_masked_group_norm, check_masked_linear,
                          register_fakes_and_autograd)
from . import pruned_kernels as kernels
from ._common import INTERPRET, autotuned, check_int32_extent, check_runnable, device_guard

# Tile sizes of the conv kernel: output pixels x output channels x input channels per step.
# Not autotuned yet. Under the interpreter the output tiles are small so that the tests' small
# shapes span several tiles. Tests may override them (None: the defaults below).
FORCE_BLOCKS: Optional[tuple[int, int, int]] = None
_BLOCKS_GPU = (64, 64, 32)
_BLOCKS_INTERPRET = (32, 16, 16)
# Elements per chunk of the group-norm kernel's passes (tests may lower it).
FORCE_GN_BLOCK: Optional[int] = None
_GN_BLOCK = 1024


# (num_warps, num_stages) of the conv launch: CONV_LAUNCH under the interpreter and with
# MMFAST_TRITON_AUTOTUNE=0, else the autotuner times CONV_SWEEP on the first call per key (below).
# From the offline sm_90 compile (scripts/triton_report.py --kernels pruned --loops): bf16 at
# 4 warps 255 registers, 275 instructions per thread per 64 x 64 x 32 step; at 8 warps 199
# registers, 156; fp32 spills 328 B at 4 warps, none at 8. Which wins is for a GPU to say.
CONV_LAUNCH = (4, 2)
CONV_SWEEP = [(4, 2), (8, 2)]
# Keyed on the pixel count's power-of-two bucket, not on HO / WO: a new resolution (or, for
# masked_linear, a new token count) reuses its bucket's choice instead of timing both configs again.
_conv_kernel = autotuned(kernels.conv_kernel, CONV_LAUNCH, CONV_SWEEP, ["CIN", "COUT", "PIXELS_BUCKET", "KH", "KW"])


def _blocks() -> tuple[int, int, int]:
    if FORCE_BLOCKS is not None:
        return FORCE_BLOCKS
    return _BLOCKS_INTERPRET if INTERPRET else _BLOCKS_GPU


def channel_lists(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(K, C) bool -> per code the channels it keeps (ascending) then those it masks, (K, C)
    int32, and the number it keeps, (K,) int32. Torch ops only: no host synchronisation."""
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
    return order.to(torch.int32).contiguous(), mask.sum(1, dtype=torch.int32)


def _launch_conv(x: Tensor, x_strides, weight: Tensor, bias: Optional[Tensor], sample_codes: Tensor,
                 in_mask: Tensor, out_mask: Tensor, y: Tensor, y_strides, geometry) -> None:
    """y[b, o, pixel] (through y_strides: sample, channel, flattened output pixel) of the conv of
    x (through x_strides: sample, channel, row, column)."""
    (height, width, out_h, out_w, kh, kw, (sh, sw), (ph, pw), (dh, dw)) = geometry
    batch, out_channels = y.shape[0], out_mask.shape[1]
    in_channels, codes = in_mask.shape[1], in_mask.shape[0]
    if y.numel() == 0:
        return
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    in_list, in_count = channel_lists(in_mask)
    out_list, out_count = channel_lists(out_mask)
    block_p, block_o, block_i = _blocks()
    pix_tiles, out_tiles = triton.cdiv(out_h * out_w, block_p), triton.cdiv(out_channels, block_o)
    per_code = out_channels * in_channels * kh * kw
    with device_guard(x):
        _conv_kernel[(batch * pix_tiles * out_tiles,)](
            x, weight, bias if bias is not None else weight, sample_codes.contiguous(), in_list, in_count,
            out_list, out_count, y,
            codes, in_channels, out_channels, height, width, out_h, out_w, kh, kw, sh, sw, ph, pw, dh, dw,
            *x_strides, *y_strides,
            per_code if weight.shape[0] > 1 else 0,
            out_channels if bias is not None and bias.shape[0] > 1 else 0,
            pix_tiles, out_tiles, triton.next_power_of_2(out_h * out_w),
            HAS_BIAS=bias is not None, DOT_PREC="tf32x3" if x.dtype == torch.float32 else None,
            UPCAST=INTERPRET and x.dtype == torch.bfloat16,
            BLOCK_P=block_p, BLOCK_O=block_o, BLOCK_I=block_i)


@torch.library.custom_op(
    "mmfast_triton::masked_conv2d", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor sample_codes, Tensor in_mask, Tensor out_mask, "
           "int[2] stride, int[2] padding, int[2] dilation) -> Tensor")
def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], sample_codes: Tensor, in_mask: Tensor,
                  out_mask: Tensor, stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    stride, padding, dilation, shape = check_masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, stride,
                                                           padding, dilation)
    check_runnable("masked_conv2d", x)
    y = x.new_empty(shape)
    _, _, height, width = x.shape
    check_int32_extent("masked_conv2d", "pixels", max(height * width, shape[2] * shape[3]))
    geometry = (height, width, shape[2], shape[3], weight.shape[3], weight.shape[4], stride, padding, dilation)
    _launch_conv(x, x.stride(), weight, bias, sample_codes, in_mask, out_mask, y,
                 (y.stride(0), y.stride(1), 1), geometry)
    return y


@torch.library.custom_op(
    "mmfast_triton::masked_linear", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor sample_codes, Tensor in_mask, Tensor out_mask) -> Tensor")
def masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], sample_codes: Tensor, in_mask: Tensor,
                  out_mask: Tensor) -> Tensor:
    check_masked_linear(x, weight, bias, sample_codes, in_mask, out_mask)
    check_runnable("masked_linear", x)
    batch, tokens, _ = x.shape
    check_int32_extent("masked_linear", "tokens", tokens)
    out_channels = weight.shape[1]
    y = x.new_empty((batch, tokens, out_channels))
    # A 1x1 conv over the (B, Cin, N, 1) view of x; y (B, N, Cout) as (sample, channel, pixel).
    x_strides = (x.stride(0), x.stride(2), x.stride(1), 0)
    geometry = (tokens, 1, tokens, 1, 1, 1, (1, 1), (0, 0), (1, 1))
    _launch_conv(x, x_strides, weight.unsqueeze(-1).unsqueeze(-1), bias, sample_codes, in_mask, out_mask, y,
                 (y.stride(0), 1, out_channels), geometry)
    return y


@torch.library.custom_op(
    "mmfast_triton::masked_group_norm", mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, int num_groups, Tensor sample_codes, Tensor channel_mask, "
           "float eps, bool silu) -> Tensor")
def masked_group_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
                      sample_codes: Tensor, channel_mask: Tensor, eps: float, silu: bool) -> Tensor:
    check_masked_group_norm(x, weight, bias, num_groups, sample_codes, channel_mask, eps, silu)
    check_runnable("masked_group_norm", x)
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous (empty_like keeps an empty x's odd strides)
    batch, channels = x.shape[:2]
    if y.numel() == 0:
        return y
    plane = x.numel() // (batch * channels)
    affine = weight if weight is not None else bias
    code_stride = channels if affine is not None and affine.dim() == 2 else 0
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    block = FORCE_GN_BLOCK or min(_GN_BLOCK, max(16, triton.next_power_of_2(plane * channels // num_groups)))
    with device_guard(x):
        kernels.group_norm_kernel[(batch * num_groups,)](
            x, weight if weight is not None else x, bias if bias is not None else x, sample_codes.contiguous(),
            channel_mask.contiguous().view(torch.uint8), y,
            channel_mask.shape[0], channels, num_groups, plane, channels // num_groups * plane, code_stride, float(eps),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=bool(silu),
            BLOCK=block, num_warps=4)
    return y


register_fakes_and_autograd("mmfast_triton")
