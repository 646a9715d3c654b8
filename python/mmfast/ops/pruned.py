"""Masked-channel (pruned-expert) ops for APTP's mixed-code batches: public API, input checks,
fake kernels and autograd.

Ops (schemas in csrc/registration.cpp; Triton twins in the namespace mmfast_triton):
  masked_conv2d(x, weight, bias?, sample_codes, in_mask, out_mask, stride, padding, dilation) -> y
  masked_linear(x, weight, bias?, sample_codes, in_mask, out_mask) -> y
  masked_group_norm(x, weight?, bias?, num_groups, sample_codes, channel_mask, eps, silu) -> y
Sample b runs the physically pruned expert of its code c = sample_codes[b]: only the channels
the code's masks keep, with the code's own weights (weight / bias stacked (K, ...); a leading
dim of 1 shares one set). Masked output channels are exactly 0, masked input channels are
never read. The rules are in csrc/include/mmfast/pruned.h; the definition in
mmfast.reference.pruned. Source: APTP (Ganjdanesh et al., ICLR 2025), whose released experts
are physically sliced UNets, one per architecture code.

Gradients (x, weight, bias) are exact but cost as much as the dense layer: they run per-sample
masked weights through one grouped dense convolution / batched GEMM (the pruned savings are a
forward, serving-time feature).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from typing import Iterator, Optional, Sequence, Union

import torch

from .. import _backend, _extension, reference
from .._dtypes import accumulation_dtype
from ..reference.pruned import conv_output_size
from ._autocast import autocast_inputs
from ._checks import check_float, check_no_forward_transforms, check_same, check_tensors, is_integer, is_real

__all__ = ["masked_conv2d", "masked_linear", "masked_group_norm", "keep_packed_weights", "pruned_weight_cache",
           "ACTIVATIONS"]

CODE_DTYPES = (torch.int64, torch.int32)
ACTIVATIONS = (None, "silu")
IntPair = Union[int, Sequence[int]]


# --- input checks ---------------------------------------------------------------------


def _pair(op: str, name: str, value: IntPair, low: int) -> tuple[int, int]:
    """(int, int) of an int or a pair (numpy ints too: they index like ints, not bools)."""
    pair = (value, value) if is_integer(value) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(is_integer(v) and v >= low for v in pair):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints >= {low}, got {value!r}")
    return tuple(int(v) for v in pair)


def check_routing(op: str, sample_codes: torch.Tensor, batch: int, masks: dict) -> int:
    """sample_codes (B,) int and the (K, C) bool masks ({name: (mask, C)}); returns K."""
    if sample_codes.dtype not in CODE_DTYPES:
        raise TypeError(f"{op}: sample_codes must be int64 or int32, got {sample_codes.dtype}")
    if tuple(sample_codes.shape) != (batch,):
        raise ValueError(f"{op}: sample_codes must be ({batch},), one architecture code per sample, got shape "
                         f"{tuple(sample_codes.shape)}")
    codes = None
    for name, (mask, channels) in masks.items():
        if mask.dtype != torch.bool:
            raise TypeError(f"{op}: {name} must be a bool (K, {channels}) tensor, got {mask.dtype}")
        if mask.dim() != 2 or mask.shape[1] != channels or mask.shape[0] == 0:
            raise ValueError(f"{op}: {name} must be (K, {channels}) with K >= 1 codes, got shape {tuple(mask.shape)}")
        if codes is not None and mask.shape[0] != codes:
            raise ValueError(f"{op}: the masks must agree on the number of codes K, got {codes} and {mask.shape[0]}")
        codes = mask.shape[0]
    return codes


def _check_stacked(op: str, name: str, t: Optional[torch.Tensor], codes: int, shape: tuple, layout: str) -> None:
    """A per-code stacked parameter: (K, *shape) or (1, *shape) when shared."""
    if t is None:
        return
    if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape or t.shape[0] not in (1, codes):
        count = "1" if codes == 1 else f"{codes} or 1"
        raise ValueError(f"{op}: {name} must be ({count}, {layout}) = ({count}, {', '.join(map(str, shape))}): one "
                         f"set per code (the masks give K = {codes} codes) or one shared, got shape {tuple(t.shape)}")
    check_float(op, name, t)


def _check_common(op: str, x: torch.Tensor, tensors: dict) -> None:
    check_float(op, "x", x)
    floats = {"x": x, **{n: t for n, t in tensors.items() if t is not None and t.is_floating_point()}}
    check_same(op, floats, "dtype")
    check_same(op, {"x": x, **{n: t for n, t in tensors.items() if t is not None}}, "device")


def _check_weights(op, x, weight, bias, sample_codes, in_mask, out_mask, layout: str) -> None:
    """Routing, per-code weight / bias and dtype / device checks of masked_conv2d and masked_linear
    (weight (K|1, Cout, Cin, ...); x's batch is dim 0)."""
    out_channels, in_channels = weight.shape[1], weight.shape[2]
    codes = check_routing(op, sample_codes, x.shape[0], {"in_mask": (in_mask, in_channels),
                                                         "out_mask": (out_mask, out_channels)})
    _check_stacked(op, "weight", weight, codes, tuple(weight.shape[1:]), layout)
    _check_stacked(op, "bias", bias, codes, (out_channels,), "Cout")
    _check_common(op, x, {"weight": weight, "bias": bias, "sample_codes": sample_codes, "in_mask": in_mask,
                          "out_mask": out_mask})


def check_masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, stride, padding, dilation):
    op = "masked_conv2d"
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D (B, Cin, H, W) tensor, got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"{op}: weight must be a 5-D (K, Cout, Cin, kh, kw) tensor (K = 1: shared), got shape "
                         f"{tuple(weight.shape)}")
    batch, in_channels, height, width = x.shape
    _, out_channels, weight_in, kh, kw = weight.shape
    if weight_in != in_channels:
        raise ValueError(f"{op}: weight's Cin = {weight_in} must equal x's {in_channels} channels")
    _check_weights(op, x, weight, bias, sample_codes, in_mask, out_mask, "Cout, Cin, kh, kw")
    if (height == 0 or width == 0) and batch > 0 and in_channels > 0:
        raise ValueError(f"{op}: x's height and width must be >= 1 unless B or Cin is 0 (as in F.conv2d), got "
                         f"{height}x{width}")
    stride, padding, dilation = (_pair(op, "stride", stride, 1), _pair(op, "padding", padding, 0),
                                 _pair(op, "dilation", dilation, 1))
    out_size = [conv_output_size(s, k, st, p, d) for s, k, st, p, d in
                zip((height, width), (kh, kw), stride, padding, dilation)]
    if min(out_size) < 1:
        raise ValueError(f"{op}: a {kh}x{kw} kernel with dilation {dilation} does not fit the padded "
                         f"{height}x{width} input (padding {padding})")
    return stride, padding, dilation, (batch, out_channels, *out_size)


def check_masked_linear(x, weight, bias, sample_codes, in_mask, out_mask) -> None:
    op = "masked_linear"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be a 3-D (B, N, Cin) tensor, got shape {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"{op}: weight must be a 3-D (K, Cout, Cin) tensor (K = 1: shared), got shape "
                         f"{tuple(weight.shape)}")
    in_channels = x.shape[2]
    if weight.shape[2] != in_channels:
        raise ValueError(f"{op}: weight's Cin = {weight.shape[2]} must equal x's last dim {in_channels}")
    _check_weights(op, x, weight, bias, sample_codes, in_mask, out_mask, "Cout, Cin")


def check_group_norm_scalars(num_groups, eps) -> None:
    """num_groups an int >= 1 and eps a finite number > 0 (checked before any backend runs: the
    native schema would coerce or reject them with less to say)."""
    op = "masked_group_norm"
    if torch.compiler.is_compiling():  # eps may be symbolic there (a changing or dynamic=True float)
        return
    if not is_integer(num_groups) or num_groups < 1:
        raise ValueError(f"{op}: num_groups must be an int >= 1, got {num_groups!r}")
    if not is_real(eps):  # a tensor or a string: the op's schema takes a Python float
        raise TypeError(f"{op}: eps must be a Python float (a finite number > 0), got {type(eps).__name__} {eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps!r}")


def check_masked_group_norm(x, weight, bias, num_groups, sample_codes, channel_mask, eps, silu=False) -> None:
    op = "masked_group_norm"
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be (B, C, *), got shape {tuple(x.shape)}")
    batch, channels = x.shape[:2]
    check_group_norm_scalars(num_groups, eps)
    if channels % num_groups:
        raise ValueError(f"{op}: num_groups must divide the {channels} channels, got {num_groups!r}")
    codes = check_routing(op, sample_codes, batch, {"channel_mask": (channel_mask, channels)})
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) not in ((channels,), (codes, channels)):
            raise ValueError(f"{op}: {name} must be ({channels},) shared or ({codes}, {channels}) per code, got "
                             f"shape {tuple(t.shape)}")
    if weight is not None and bias is not None and weight.dim() != bias.dim():
        raise ValueError(f"{op}: weight and bias must both be shared (C,) or both per code (K, C), got shapes "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    _check_common(op, x, {"weight": weight, "bias": bias, "sample_codes": sample_codes,
                          "channel_mask": channel_mask})


def _affine_forms(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], x: torch.Tensor,
                  channel_mask: torch.Tensor):
    """The op takes weight and bias both shared (C,) or both per code (K, C). Valid other forms
    are rewritten to that: a (1, C) one as shared (a view: gradients flow back to it), as
    masked_conv2d's K = 1 weight; a shared one beside a per-code one expanded to (K, C), as
    masked_conv2d takes a (1, Cout) bias beside K weights. Anything else is passed as given, so
    that the checks name the shapes the caller passed."""
    if x.dim() < 2 or channel_mask.dim() != 2:
        return weight, bias
    channels, codes = x.shape[1], channel_mask.shape[0]

    def form(t):  # compared, not hashed: a dict keyed by symbolic sizes made torch.compile specialise on them
        shape = tuple(t.shape)
        if shape == (codes, channels):  # first: with K = 1 a (1, C) tensor is per code
            return "per code"
        return "shared" if shape == (channels,) or shape == (1, channels) else None

    forms = [None if t is None else form(t) for t in (weight, bias)]
    if any(t is not None and f is None for t, f in zip((weight, bias), forms)):
        return weight, bias
    weight, bias = (t[0] if t is not None and t.dim() == 2 and f == "shared" and codes != 1 else t
                    for t, f in zip((weight, bias), forms))
    if "per code" in forms and "shared" in forms:
        weight, bias = (t if t is None or t.dim() == 2 else t.expand(codes, -1).contiguous() for t in (weight, bias))
    return weight, bias


def _check_activation(activation) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"masked_group_norm: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation == "silu"


# --- fake kernels ----------------------------------------------------------------------


def _fake_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, stride, padding, dilation):
    *_, shape = check_masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, stride, padding, dilation)
    return x.new_empty(shape)


def _fake_linear(x, weight, bias, sample_codes, in_mask, out_mask):
    check_masked_linear(x, weight, bias, sample_codes, in_mask, out_mask)
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[1]))


def _fake_group_norm(x, weight, bias, num_groups, sample_codes, channel_mask, eps, silu):
    check_masked_group_norm(x, weight, bias, num_groups, sample_codes, channel_mask, eps, silu)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# --- autograd --------------------------------------------------------------------------
# Per sample b the op is the dense op with the masked weight W_c(b) * (out_mask ⊗ in_mask), so
# the gradients are those of a grouped dense op with per-sample weights; weight and bias
# gradients are summed per code.


def _per_sample(stacked: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return stacked[codes] if stacked.shape[0] > 1 else stacked.expand(codes.shape[0], *stacked.shape[1:])


def _sum_per_code(per_sample: torch.Tensor, codes: torch.Tensor, stacked_len: int) -> torch.Tensor:
    if stacked_len == 1:
        return per_sample.sum(0, keepdim=True)
    out = per_sample.new_zeros((stacked_len, *per_sample.shape[1:]))
    return out.index_add_(0, codes, per_sample)


def _routing_setup(ctx, x, weight, bias, sample_codes, in_mask, out_mask):
    ctx.save_for_backward(x, weight, sample_codes, in_mask, out_mask)
    ctx.bias_codes = None if bias is None else bias.shape[0]


def _masks(ctx):
    x, weight, sample_codes, in_mask, out_mask = ctx.saved_tensors
    codes = sample_codes.long()
    keep_out, keep_in = out_mask[codes], in_mask[codes]
    return x, weight, codes, keep_out, keep_in


def _conv2d_setup(ctx, inputs, output):
    x, weight, bias, sample_codes, in_mask, out_mask, stride, padding, dilation = inputs
    _routing_setup(ctx, x, weight, bias, sample_codes, in_mask, out_mask)
    ctx.conv = (list(stride), list(padding), list(dilation))


def _conv2d_backward(ctx, grad):
    x, weight, codes, keep_out, keep_in = _masks(ctx)
    batch, in_channels, height, width = x.shape
    _, out_channels, _, kh, kw = weight.shape
    if batch == 0 or out_channels == 0:  # a grouped convolution needs groups >= 1 and an output channel
        grad_b = None if ctx.bias_codes is None else weight.new_zeros((ctx.bias_codes, out_channels))
        return torch.zeros_like(x), torch.zeros_like(weight), grad_b, None, None, None, None, None, None
    keep = (keep_out[:, :, None] & keep_in[:, None, :])[..., None, None]
    weights = torch.where(keep, _per_sample(weight, codes), 0)
    grad = torch.where(keep_out[:, :, None, None], grad, 0)
    stride, padding, dilation = ctx.conv
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad.reshape(1, batch * out_channels, *grad.shape[2:]),
        torch.where(keep_in[:, :, None, None], x, 0).reshape(1, batch * in_channels, height, width),
        weights.reshape(batch * out_channels, in_channels, kh, kw), None, stride, padding, dilation, False, [0, 0],
        batch, [need_x, need_w, False])
    if need_x:
        grad_x = grad_x.reshape(x.shape)
    if need_w:
        grad_w = grad_w.reshape(batch, out_channels, in_channels, kh, kw)
        grad_w = _sum_per_code(torch.where(keep, grad_w, 0), codes, weight.shape[0])
    grad_b = None if ctx.bias_codes is None else _sum_per_code(grad.sum((2, 3)), codes, ctx.bias_codes)
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _linear_setup(ctx, inputs, output):
    _routing_setup(ctx, *inputs)


def _linear_backward(ctx, grad):
    x, weight, codes, keep_out, keep_in = _masks(ctx)
    keep = keep_out[:, :, None] & keep_in[:, None, :]
    grad = torch.where(keep_out[:, None, :], grad, 0)
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.bmm(grad, torch.where(keep, _per_sample(weight, codes), 0))
    if ctx.needs_input_grad[1]:
        per_sample = torch.bmm(grad.transpose(1, 2), torch.where(keep_in[:, None, :], x, 0))
        grad_w = _sum_per_code(torch.where(keep, per_sample, 0), codes, weight.shape[0])
    grad_b = None if ctx.bias_codes is None else _sum_per_code(grad.sum(1), codes, ctx.bias_codes)
    return grad_x, grad_w, grad_b, None, None, None


def _group_norm_setup(ctx, inputs, output):
    x, weight, bias, num_groups, sample_codes, channel_mask, eps, silu = inputs
    ctx.save_for_backward(x, weight, bias, sample_codes, channel_mask)
    ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu


def _affine_per_sample(t, codes, channels, acc, default: float):
    if t is None:
        return torch.full((codes.shape[0], channels), default, dtype=acc, device=codes.device)
    t = t.to(acc)
    return t[codes] if t.dim() == 2 else t.expand(codes.shape[0], channels)


def _group_norm_backward(ctx, grad):
    x, weight, bias, sample_codes, channel_mask = ctx.saved_tensors
    acc = accumulation_dtype(x.dtype)
    batch, channels = x.shape[:2]
    groups = ctx.num_groups
    codes = sample_codes.long()
    grouped = (batch, groups, channels // groups, math.prod(x.shape[2:]))
    mask = channel_mask[codes].reshape(batch, groups, channels // groups, 1)
    xg = x.to(acc).reshape(grouped)
    count = (mask.sum(dim=(2, 3), keepdim=True) * xg.shape[-1]).clamp(min=1)
    mean = torch.where(mask, xg, 0).sum(dim=(2, 3), keepdim=True) / count
    centered = torch.where(mask, xg - mean, 0)
    rstd = torch.rsqrt((centered * centered).sum(dim=(2, 3), keepdim=True) / count + ctx.eps)
    xhat = centered * rstd
    # masked channels' affine slots are never read, as in the forward (0 * NaN would poison the sums)
    w = torch.where(mask, _affine_per_sample(weight, codes, channels, acc, 1.0).reshape(mask.shape), 0)
    b = torch.where(mask, _affine_per_sample(bias, codes, channels, acc, 0.0).reshape(mask.shape), 0)
    dz = torch.where(mask, grad.to(acc).reshape(grouped), 0)
    if ctx.silu:
        z = xhat * w + b
        s = torch.sigmoid(z)
        dz = torch.where(mask, dz * s * (1 + z * (1 - s)), 0)
    dxhat = dz * w
    mean_dxhat = dxhat.sum(dim=(2, 3), keepdim=True) / count
    mean_dxhat_xhat = (dxhat * xhat).sum(dim=(2, 3), keepdim=True) / count
    grad_x = torch.where(mask, rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat), 0).reshape(x.shape)

    def affine_grad(t, per_sample):
        if t is None:
            return None
        per_sample = per_sample.reshape(batch, channels)
        return (per_sample.sum(0) if t.dim() == 1 else _sum_per_code(per_sample, codes, t.shape[0])).to(t.dtype)

    grad_w = affine_grad(weight, (dz * xhat).sum(-1))
    grad_b = affine_grad(bias, dz.sum(-1))
    return grad_x.to(x.dtype), grad_w, grad_b, None, None, None, None, None


def register_fakes_and_autograd(namespace: str) -> None:
    """Fake kernels and autograd of the masked ops in `namespace`."""
    for name, fake, setup, backward in (
            ("masked_conv2d", _fake_conv2d, _conv2d_setup, _conv2d_backward),
            ("masked_linear", _fake_linear, _linear_setup, _linear_backward),
            ("masked_group_norm", _fake_group_norm, _group_norm_setup, _group_norm_backward)):
        torch.library.register_fake(f"{namespace}::{name}", fake)
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup)


if _extension.loaded():
    register_fakes_and_autograd("mmfast")


# --- public API ---------------------------------------------------------------------------


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], sample_codes: torch.Tensor,
                  in_mask: torch.Tensor, out_mask: torch.Tensor, *, stride: IntPair = 1, padding: IntPair = 0,
                  dilation: IntPair = 1, backend: Optional[str] = None) -> torch.Tensor:
    """The conv of each sample's pruned expert, for a batch that mixes architecture codes (APTP,
    arXiv 2406.12042: one prompt-routed pruned expert per sample, batched together).

    x: (B, Cin, H, W) float (fp32, fp16, bf16, fp64; no fp64 on Triton), H and W >= 1 unless B
    or Cin is 0 (as in F.conv2d); weight: (K, Cout, Cin, kh,
    kw), one set per code (K = 1: shared); bias: (K or 1, Cout) or None; sample_codes: (B,)
    int64 / int32 in [0, K); in_mask (K, Cin), out_mask (K, Cout) bool. stride, padding,
    dilation: an int or a pair of ints, as in torch.nn.functional.conv2d (zero padding; not
    its "same" / "valid" strings: give the padding, e.g. (kh - 1) // 2 for stride 1 and odd kh).
    Returns y (B, Cout, Ho, Wo), contiguous, in x's dtype: for sample b of code c the conv of
    the expert sliced to c's kept inputs and outputs, embedded in the dense channel layout;
    masked outputs exactly 0, masked inputs never read (even NaN). Accumulates in fp32 (fp64).
    CPU: the batch is grouped by code; per code, a hand-written kernel packs the kept input
    channels and the code's kept weights, oneDNN runs one dense convolution, and a second
    kernel writes the code's rows (masked channels 0): work scales with kept_in x kept_out.
    fp16 on a CPU whose torch has no oneDNN fp16 (no AVX512-FP16 / AMX-FP16; torch's own fp16
    conv and GEMM there take ~100x / ~20x the fp32 time) is convolved in fp32 (the packed
    inputs and weights converted, the result rounded once to fp16): it equals this op on
    x.float() etc. rounded to fp16. Inside keep_packed_weights() each code's packed weight is kept across calls; a per-thread
    scratch (up to 64 MB per buffer) always is. CUDA /
    Triton: one implicit-GEMM launch for the whole batch (tiles never straddle two codes), after
    a small launch (CUDA) or a few torch ops (Triton) that list each code's kept channels. CUDA
    fp16 / bf16 on sm_80+ first packs the kept input channels (channels innermost) and the used
    codes' kept weights into a workspace (K x kh*kw x Cout x Cin8 + B x H x W x Cin8 elements,
    Cin8 = Cin rounded up to 8), then streams both through cp.async + mma.sync; inside
    keep_packed_weights() every code's packed weights are kept instead of packed per call. Other
    dtypes and archs: register-staged tiles (TF32 tensor cores for fp16 / bf16 on sm_80+).
    Raises ValueError (shapes, masks, conv arguments), TypeError (dtypes, devices), IndexError
    (a code outside [0, K): CPU and reference; CUDA and Triton write NaN over that sample
    instead, with no host synchronisation).
    """
    check_tensors("masked_conv2d", {"x": x, "weight": weight, "bias": bias, "sample_codes": sample_codes,
                              "in_mask": in_mask, "out_mask": out_mask}, ("bias",))
    x, weight, bias = autocast_inputs("lower", x.device, x, weight, bias)  # as F.conv2d
    chosen = _backend.resolve("masked_conv2d", x.device, backend)
    check_no_forward_transforms("masked_conv2d", chosen, x, weight, bias)
    if chosen == "native":  # the compiled op checks the same in C++ (a UNet step calls this ~70 times)
        stride, padding, dilation = (_pair("masked_conv2d", "stride", stride, 1),
                                     _pair("masked_conv2d", "padding", padding, 0),
                                     _pair("masked_conv2d", "dilation", dilation, 1))
    else:
        stride, padding, dilation, _ = check_masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, stride,
                                                           padding, dilation)
    if chosen == "reference":
        return reference.masked_conv2d_ref(x, weight, bias, sample_codes, in_mask, out_mask, stride, padding, dilation)
    if chosen == "native":
        _warn_if_kept_while_training("masked_conv2d", weight)
    return _backend.op_overload("masked_conv2d", chosen)(x, weight, bias, sample_codes, in_mask, out_mask,
                                                         list(stride), list(padding), list(dilation))


class _OpenPlans(list):
    """The keep_packed_weights blocks open in any thread, oldest first, and the budget before the
    first of them (restored when the last one exits, whatever the order of exits)."""
    base = 0


_open_plans = _OpenPlans()
_plan_lock = threading.Lock()


def _new_plan_lock_in_child():  # a fork while another thread held it would leave the child's held
    global _plan_lock
    _plan_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_plan_lock_in_child)


@contextlib.contextmanager
def keep_packed_weights(budget_mb: int = 1024) -> Iterator[None]:
    """A static plan for masked_conv2d / masked_linear: inside the block, packed weights are made
    on the first call and reused by later calls, as long as the source weight (CUDA: and both
    masks) is alive and unchanged. CPU: each code's kept output rows and input columns,
    contiguous. CUDA (fp16 / bf16, sm_80+): every code's weights in the layout the cp.async
    kernel reads (K x kh*kw x Cout x Cin8 elements, Cin8 = Cin rounded up to 8: about the stacked
    weight's size), so a call launches no weight packing; a new entry is packed with a stream
    synchronisation (once per layer), and none is made while a CUDA graph is being captured.

    APTP's codes and experts stay fixed over a sampling run's 25-50 denoising steps, so wrap the
    run: ``with keep_packed_weights(): images = sample(...)``. The group-by-code baseline holds
    pre-sliced experts the same way. Entries are keyed by the weight's storage (held weakly),
    offset, shape, dtype and version counter (an in-place op on the weight or a view of it is a
    new version) and by the code's kept channels (CUDA: by both masks' storages and versions),
    so a changed mask or an in-place update is repacked. Not seen: writes through an alias with a
    version counter of its own (``weight.data``, as gradcheck makes, ``.numpy()``, DLPack, ``set_``,
    the untyped storage) and in-place updates that bump no version (torch's optimizers with
    ``fused=True``), which would be served stale: the reason this is opt-in, and meant for sampling,
    not training (a grad-enabled call on a weight that requires grad warns once). Not kept:
    inference tensors (no version counter), non-contiguous weights, and anything past budget_mb MiB
    (then packed per call; nothing is evicted, since a UNet visits its layers in a cycle, where
    least-recently-used eviction would miss every time). The budget is process-wide (not per
    thread); on exit the previous budget comes back and every kept weight is dropped, the outer
    block's too when blocks nest. Outside any block the budget is MMFAST_PRUNED_WEIGHT_CACHE_MB
    (read once; default 0, off). Blocks in several threads share the one budget: the newest open
    block's holds, and the budget from before the first comes back when the last one exits, in
    whatever order they exit. Under torch.autocast a weight of another dtype is cast anew on
    every call, a new tensor each time: nothing is kept then (cast the model instead). Raises
    ValueError for a negative budget, RuntimeError without the compiled extension.
    """
    if not is_integer(budget_mb) or budget_mb < 0 or budget_mb >= 2**62:
        raise ValueError(f"keep_packed_weights: budget_mb must be an int in [0, 2**62) (MiB), got {budget_mb!r}")
    _require_extension("keep_packed_weights")
    block = object()
    with _plan_lock:  # blocks of several threads may exit in any order: the newest open one's budget holds
        if not _open_plans:
            _open_plans.base = torch.ops.mmfast.pruned_weight_cache(-1, False)[2]
        _open_plans.append((block, int(budget_mb)))
        torch.ops.mmfast.pruned_weight_cache(int(budget_mb), False)
    try:
        yield
    finally:
        with _plan_lock:
            _open_plans[:] = [entry for entry in _open_plans if entry[0] is not block]
            budget = _open_plans[-1][1] if _open_plans else _open_plans.base
            torch.ops.mmfast.pruned_weight_cache(budget, True)


_warned_kept_while_training = False


def _warn_if_kept_while_training(op: str, weight: torch.Tensor) -> None:
    """Warns once when a weight that is being trained (requires grad, grad mode on) meets a
    static plan: optimizers with fused=True update weights without a version bump, so their
    packed copies would be served stale."""
    global _warned_kept_while_training
    if _warned_kept_while_training or not (weight.requires_grad and torch.is_grad_enabled()):
        return
    if torch.compiler.is_compiling() or torch.ops.mmfast.pruned_weight_cache(-1, False)[2] == 0:
        return
    _warned_kept_while_training = True
    warnings.warn(f"{op}: a weight that requires grad is kept packed (keep_packed_weights or "
                  "MMFAST_PRUNED_WEIGHT_CACHE_MB) in a grad-enabled call; an optimizer step with fused=True "
                  "updates it without a version bump, and its packed copy would then be served stale. Keep "
                  "packed weights for sampling (no_grad / inference_mode), not training.", stacklevel=3)


def pruned_weight_cache(clear: bool = False) -> dict:
    """What the masked ops keep, CPU and CUDA (see keep_packed_weights): {"entries": n, "bytes": b,
    "budget_mb": m}, read before emptying it when clear=True (entries of freed weights also go
    on the next insertion). Raises RuntimeError without the compiled extension."""
    _require_extension("pruned_weight_cache")
    entries, nbytes, budget_mb = torch.ops.mmfast.pruned_weight_cache(-1, clear)
    return {"entries": entries, "bytes": nbytes, "budget_mb": budget_mb}


def _require_extension(name: str) -> None:
    if not _extension.loaded():
        raise RuntimeError(f"{name}: {_extension.describe_missing(torch.device('cpu'))}")


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], sample_codes: torch.Tensor,
                  in_mask: torch.Tensor, out_mask: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """F.linear of each sample's pruned expert (APTP, arXiv 2406.12042), for a mixed-code batch of token sequences
    (attention q/k/v/out pruned by head, GEGLU feed-forward by group).

    x: (B, N, Cin); weight: (K or 1, Cout, Cin); bias: (K or 1, Cout) or None; sample_codes
    (B,) int in [0, K); in_mask (K, Cin), out_mask (K, Cout) bool. Returns (B, N, Cout),
    contiguous, in x's dtype; same rules and errors as masked_conv2d.
    """
    check_tensors("masked_linear", {"x": x, "weight": weight, "bias": bias, "sample_codes": sample_codes,
                              "in_mask": in_mask, "out_mask": out_mask}, ("bias",))
    x, weight, bias = autocast_inputs("lower", x.device, x, weight, bias)  # as F.linear
    chosen = _backend.resolve("masked_linear", x.device, backend)
    check_no_forward_transforms("masked_linear", chosen, x, weight, bias)
    if chosen != "native":  # the compiled op checks the same in C++
        check_masked_linear(x, weight, bias, sample_codes, in_mask, out_mask)
    if chosen == "reference":
        return reference.masked_linear_ref(x, weight, bias, sample_codes, in_mask, out_mask)
    if chosen == "native":
        _warn_if_kept_while_training("masked_linear", weight)
    return _backend.op_overload("masked_linear", chosen)(x, weight, bias, sample_codes, in_mask, out_mask)


def masked_group_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      num_groups: int, sample_codes: torch.Tensor, channel_mask: torch.Tensor, *,
                      eps: float = 1e-5, activation: Optional[str] = None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """GroupNorm of each sample's pruned expert (+ SiLU), for a mixed-code batch.

    x: (B, C, *) float; weight / bias: (C,) or (1, C) shared (as masked_conv2d's K = 1 weight), or (K,
    C) per code (fine-tuned experts differ), or None, each in either form; num_groups divides C
    (groups of C / num_groups contiguous channels); sample_codes (B,) int in [0, K); channel_mask
    (K, C) bool. Statistics of group g of sample
    b run over the channels its code keeps (torch.nn.GroupNorm's biased variance), in fp32
    (fp64): with whole groups kept or dropped, as APTP prunes, this is exactly the GroupNorm of
    the physically pruned expert. activation: None or "silu" (fused). Masked channels are
    exactly 0 and never read. Unlike APTP's masked training model (mask, then GroupNorm, which
    leaks silu(bias) from masked groups), these are the pruned semantics the released experts
    compute. Returns a contiguous tensor like x. Errors as masked_conv2d.
    """
    check_tensors("masked_group_norm", {"x": x, "weight": weight, "bias": bias, "sample_codes": sample_codes,
                                        "channel_mask": channel_mask}, ("weight", "bias"))
    silu = _check_activation(activation)
    check_group_norm_scalars(num_groups, eps)
    x, weight, bias = autocast_inputs("fp32", x.device, x, weight, bias)  # as F.group_norm on CUDA
    weight, bias = _affine_forms(weight, bias, x, channel_mask)
    chosen = _backend.resolve("masked_group_norm", x.device, backend)
    check_no_forward_transforms("masked_group_norm", chosen, x, weight, bias)
    if chosen != "native":  # the compiled op checks the same in C++
        check_masked_group_norm(x, weight, bias, num_groups, sample_codes, channel_mask, eps)
    if chosen == "reference":
        return reference.masked_group_norm_ref(x, weight, bias, num_groups, sample_codes, channel_mask, eps, silu)
    return _backend.op_overload("masked_group_norm", chosen)(x, weight, bias, num_groups, sample_codes, channel_mask,
                                                             float(eps), silu)
