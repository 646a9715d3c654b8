"""Reference of the masked-channel (pruned-expert) ops of APTP: each sample runs the
physically sliced expert of its architecture code, embedded back into the dense layout.

Written as the definition: per code present, slice the kept input channels of x and the kept
rows / columns of that code's weights, run torch's dense op, scatter into the kept output
channels; every other channel is exactly 0. Computed in fp32 (fp64 for fp64 inputs) and
returned in the input dtype. Rules: csrc/include/mmfast/pruned.h.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .._dtypes import accumulation_dtype
from ._graph import connected

__all__ = ["masked_conv2d_ref", "masked_linear_ref", "masked_group_norm_ref", "conv_output_size"]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """F.conv2d's output size along one spatial dim."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_code_range(sample_codes: torch.Tensor, codes: int, op: str) -> None:
    if sample_codes.numel() and (int(sample_codes.min()) < 0 or int(sample_codes.max()) >= codes):
        bad = [int(c) for c in sample_codes.tolist() if not 0 <= int(c) < codes][0]
        raise IndexError(f"{op}: sample code {bad} is out of range for {codes} architecture codes")


def _per_code(weight: Optional[torch.Tensor], code: int) -> Optional[torch.Tensor]:
    """Code `code`'s slice of a per-code stacked tensor (leading dim K, or 1 when shared)."""
    if weight is None:
        return None
    return weight[code if weight.shape[0] > 1 else 0]


def _masked_op(x, weight, bias, sample_codes, in_mask, out_mask, out_shape, dense_op, op: str):
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        # the reference sums in the accumulation dtype: autocast would lower its convs / GEMMs again
        # (the public wrapper has already cast the inputs as autocast casts torch's own ops)
        with torch.autocast(x.device.type, enabled=False):
            return _masked_op(x, weight, bias, sample_codes, in_mask, out_mask, out_shape, dense_op, op)
    acc = accumulation_dtype(x.dtype)
    _check_code_range(sample_codes, in_mask.shape[0], op)
    y = torch.zeros(out_shape, dtype=acc, device=x.device)
    codes = sample_codes.long()
    for code in torch.unique(codes).tolist():
        rows = torch.nonzero(codes == code)[:, 0]
        kept_in = torch.nonzero(in_mask[code])[:, 0]
        kept_out = torch.nonzero(out_mask[code])[:, 0]
        if kept_out.numel() == 0:
            continue
        w = _per_code(weight, code)[kept_out][:, kept_in].to(acc)
        b = None if bias is None else _per_code(bias, code)[kept_out].to(acc)
        out = dense_op(x[rows][:, kept_in].to(acc), w, b)
        block = y[rows]
        block[:, kept_out] = out
        y = y.index_copy(0, rows, block)
    return connected(y, (x, weight, bias)).to(x.dtype)


def masked_conv2d_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      sample_codes: torch.Tensor, in_mask: torch.Tensor, out_mask: torch.Tensor,
                      stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                      dilation: Sequence[int] = (1, 1)) -> torch.Tensor:
    """x (B, Cin, H, W), weight (K|1, Cout, Cin, kh, kw), bias (K|1, Cout)?, sample_codes (B,),
    in_mask (K, Cin), out_mask (K, Cout) bool -> y (B, Cout, Ho, Wo) in x's dtype."""
    batch, _, height, width = x.shape
    _, out_channels, _, kh, kw = weight.shape
    out_shape = (batch, out_channels,
                 conv_output_size(height, kh, stride[0], padding[0], dilation[0]),
                 conv_output_size(width, kw, stride[1], padding[1], dilation[1]))

    def conv(xs, w, b):
        if xs.shape[1] == 0:  # nothing kept on the input side: the bias alone
            out = xs.new_zeros((xs.shape[0], w.shape[0], *out_shape[2:]))
            return out if b is None else out + b[:, None, None]
        return F.conv2d(xs, w, b, tuple(stride), tuple(padding), tuple(dilation))

    return _masked_op(x, weight, bias, sample_codes, in_mask, out_mask, out_shape, conv, "masked_conv2d")


def masked_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      sample_codes: torch.Tensor, in_mask: torch.Tensor, out_mask: torch.Tensor) -> torch.Tensor:
    """x (B, N, Cin), weight (K|1, Cout, Cin), bias (K|1, Cout)?, sample_codes (B,), in_mask
    (K, Cin), out_mask (K, Cout) bool -> y (B, N, Cout) in x's dtype."""
    out_shape = (x.shape[0], x.shape[1], weight.shape[1])

    def linear(xs, w, b):
        # (rows, N, kept_in) -> (rows, kept_out, N) so the scatter indexes dim 1 like the conv
        return F.linear(xs.transpose(1, 2), w, b).transpose(1, 2)

    y = _masked_op(x.transpose(1, 2), weight, bias, sample_codes, in_mask, out_mask,
                   (out_shape[0], out_shape[2], out_shape[1]), linear, "masked_linear")
    return y.transpose(1, 2).contiguous()


def masked_group_norm_ref(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          num_groups: int, sample_codes: torch.Tensor, channel_mask: torch.Tensor,
                          eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """x (B, C, *), weight / bias (C,) shared or (K, C) per code or None, channel_mask (K, C)
    bool -> y like x: the GroupNorm of the pruned expert (statistics over the kept channels of
    each group), optionally followed by SiLU; masked channels exactly 0."""
    acc = accumulation_dtype(x.dtype)
    _check_code_range(sample_codes, channel_mask.shape[0], "masked_group_norm")
    batch, channels = x.shape[:2]
    codes = sample_codes.long()
    mask = channel_mask[codes].reshape(batch, num_groups, channels // num_groups, 1)
    plane = math.prod(x.shape[2:])
    xg = x.to(acc).reshape(batch, num_groups, channels // num_groups, plane)
    count = (mask.sum(dim=(2, 3), keepdim=True) * xg.shape[-1]).clamp(min=1)
    # torch.where, not a multiply: masked channels are never read, even when they hold NaN
    mean = torch.where(mask, xg, 0).sum(dim=(2, 3), keepdim=True) / count
    centered = torch.where(mask, xg - mean, 0)
    var = (centered * centered).sum(dim=(2, 3), keepdim=True) / count
    y = (centered * torch.rsqrt(var + eps)).reshape(batch, channels, plane)

    def per_sample(t):  # masked channels' slots never read (a NaN there must not reach any gradient)
        t = t.to(acc)
        t = (t[codes] if t.dim() == 2 else t.expand(batch, channels))[:, :, None]
        return torch.where(mask.reshape(batch, channels, 1), t, 0)

    if weight is not None:
        y = y * per_sample(weight)
    if bias is not None:
        y = y + per_sample(bias)
    if silu:
        y = F.silu(y)
    y = torch.where(mask.reshape(batch, channels, 1), y, 0)
    return y.reshape(x.shape).to(x.dtype).contiguous()  # contiguous like the kernels' (channels-last x)
