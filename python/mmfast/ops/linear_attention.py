"""Non-causal normalised linear attention (LinFusion, arXiv 2409.02097): public API, input
checks, fake kernels and autograd.

The five ops (schemas in csrc/registration.cpp; Triton twins of the same names in the
namespace mmfast_triton, python/mmfast/triton/linear_attention.py):
  linear_attention(q, k, v, eps, feature_map) -> out
  linear_attention_state(k, v, feature_map) -> (state, mean)
  linear_attention_apply(q, state, mean, eps, feature_map) -> out
  linear_attention_apply_backward(grad_out, q, state, mean, eps, feature_map) -> (grad_q, grad_state, grad_mean)
  linear_attention_state_backward(grad_state, grad_mean, k, v, feature_map) -> (grad_k, grad_v)
The checks here are shared by every backend; the C++ glue repeats them for callers of
torch.ops.mmfast.* directly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _backend, _extension, reference
from .._dtypes import accumulation_dtype
from ..reference._graph import connected
from ..reference.linear_attention import FEATURE_MAPS
from ._autocast import autocast_inputs
from ._checks import check_float, check_no_forward_transforms, check_rank, check_same, check_tensors, is_real

__all__ = ["linear_attention", "linear_attention_state", "linear_attention_apply"]

OP = "linear_attention"
MAX_HEAD_DIM = 256


# --- input checks ---------------------------------------------------------------------


# `op` names the public op in errors: linear_attention_state and linear_attention_apply report
# as themselves (their backward passes, reached only through autograd, as linear_attention).


def _check_token_tensor(name: str, t: torch.Tensor, layout: str, op: str = OP) -> None:
    check_rank(op, name, t, 4, layout)
    check_float(op, name, t)


def _check_head_dim(name: str, d: int, op: str = OP) -> None:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: {name} must be in [1, {MAX_HEAD_DIM}], got {d}")


def _check_sequence(n: int, op: str = OP) -> None:
    if n == 0:
        raise ValueError(f"{op}: the sequence length N must be at least 1, got 0")


def check_eps(eps: float, op: str = OP) -> None:
    if torch.compiler.is_compiling():  # eps may be symbolic there (a changing or dynamic=True float)
        return
    if not is_real(eps):  # a tensor or a string: the op's schema takes a Python float
        raise TypeError(f"{op}: eps must be a Python float (a finite number >= 0), got {type(eps).__name__} {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def check_feature_map(feature_map: str, op: str = OP) -> None:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"{op}: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def check_kv(k: torch.Tensor, v: torch.Tensor, feature_map: str, op: str = OP):
    """Returns (B, N, H, Dk, Dv)."""
    check_feature_map(feature_map, op)
    _check_token_tensor("k", k, "(B, N, H, Dk)", op)
    _check_token_tensor("v", v, "(B, N, H, Dv)", op)
    check_same(op, {"k": k, "v": v}, "dtype")
    check_same(op, {"k": k, "v": v}, "device")
    b, n, h, dk = k.shape
    if tuple(v.shape[:3]) != (b, n, h):
        raise ValueError(f"{op}: k and v must agree in (B, N, H), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    _check_sequence(n, op)
    _check_head_dim("Dk (k.shape[-1])", dk, op)
    _check_head_dim("Dv (v.shape[-1])", v.shape[-1], op)
    return b, n, h, dk, v.shape[-1]


def check_qkv(q, k, v, feature_map: str):
    """Returns (B, N, H, Dk, Dv); q has the same (B, N, H, Dk) as k."""
    _check_token_tensor("q", q, "(B, N, H, Dk)")
    dims = check_kv(k, v, feature_map)
    check_same(OP, {"q": q, "k": k, "v": v}, "dtype")
    check_same(OP, {"q": q, "k": k, "v": v}, "device")
    if tuple(q.shape) != tuple(k.shape):
        raise ValueError(f"{OP}: q and k must have the same (B, N, H, Dk) shape, got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    return dims


def check_apply(q, state, mean, feature_map: str, op: str = OP):
    """Returns (B, N, H, Dk, Dv) for linear_attention_apply."""
    check_feature_map(feature_map, op)
    _check_token_tensor("q", q, "(B, N, Hq, Dk)", op)
    b, n, h, dk = q.shape
    _check_sequence(n, op)
    _check_head_dim("Dk (q.shape[-1])", dk, op)
    if state.dim() != 4 or tuple(state.shape[:3]) != (b, h, dk):
        raise ValueError(f"{op}: state must be (B, H, Dk, Dv) = ({b}, {h}, {dk}, Dv), got {tuple(state.shape)}")
    if tuple(mean.shape) != (b, h, dk):
        raise ValueError(f"{op}: mean must be (B, H, Dk) = ({b}, {h}, {dk}), got {tuple(mean.shape)}")
    _check_head_dim("Dv (state.shape[-1])", state.shape[-1], op)
    acc = accumulation_dtype(q.dtype)
    for name, t in (("state", state), ("mean", mean)):
        if t.dtype != acc:
            raise TypeError(f"{op}: {name} must be {acc} for {q.dtype} inputs, got {t.dtype}")
    check_same(op, {"q": q, "state": state, "mean": mean}, "device")
    return b, n, h, dk, state.shape[-1]


def check_apply_backward(grad_out, q, state, mean, feature_map: str):
    dims = check_apply(q, state, mean, feature_map)
    b, n, h, _, dv = dims
    if tuple(grad_out.shape) != (b, n, h, dv):
        raise ValueError(f"{OP}: grad_out must be (B, N, H, Dv) = {(b, n, h, dv)}, got {tuple(grad_out.shape)}")
    for attr in ("dtype", "device"):  # as the native op checks (the fakes run these checks too)
        check_same(OP, {"grad_out": grad_out, "q": q}, attr)
    return dims


def check_state_backward(grad_state, grad_mean, k, v, feature_map: str):
    dims = check_kv(k, v, feature_map)
    b, _, h, dk, dv = dims
    if tuple(grad_state.shape) != (b, h, dk, dv) or tuple(grad_mean.shape) != (b, h, dk):
        raise ValueError(f"{OP}: grad_state must be (B, H, Dk, Dv) = {[b, h, dk, dv]} and grad_mean (B, H, Dk) = "
                         f"{[b, h, dk]}, got {list(grad_state.shape)} and {list(grad_mean.shape)}")
    acc = accumulation_dtype(k.dtype)
    if grad_state.dtype != acc or grad_mean.dtype != acc:
        raise TypeError(f"{OP}: grad_state and grad_mean must be {acc} for {k.dtype} inputs, got {grad_state.dtype} "
                        f"and {grad_mean.dtype}")
    check_same(OP, {"grad_state": grad_state, "grad_mean": grad_mean, "k": k}, "device")
    return dims


# --- fake kernels: shapes and dtypes only (every op returns contiguous tensors) ---------


def _fake_forward(q, k, v, eps, feature_map):
    check_eps(eps)
    b, n, h, _, dv = check_qkv(q, k, v, feature_map)
    return q.new_empty((b, n, h, dv))


def _fake_state(k, v, feature_map):
    b, _, h, dk, dv = check_kv(k, v, feature_map, "linear_attention_state")
    acc = accumulation_dtype(k.dtype)
    return k.new_empty((b, h, dk, dv), dtype=acc), k.new_empty((b, h, dk), dtype=acc)


def _fake_apply(q, state, mean, eps, feature_map):
    check_eps(eps, "linear_attention_apply")
    b, n, h, _, dv = check_apply(q, state, mean, feature_map, "linear_attention_apply")
    return q.new_empty((b, n, h, dv))


def _fake_apply_backward(grad_out, q, state, mean, eps, feature_map):
    check_eps(eps)
    check_apply_backward(grad_out, q, state, mean, feature_map)
    return q.new_empty(q.shape), state.new_empty(state.shape), mean.new_empty(mean.shape)


def _fake_state_backward(grad_state, grad_mean, k, v, feature_map):
    check_state_backward(grad_state, grad_mean, k, v, feature_map)
    return k.new_empty(k.shape), v.new_empty(v.shape)


_FAKES = {
    "linear_attention": _fake_forward,
    "linear_attention_state": _fake_state,
    "linear_attention_apply": _fake_apply,
    "linear_attention_apply_backward": _fake_apply_backward,
    "linear_attention_state_backward": _fake_state_backward,
}


# --- autograd -------------------------------------------------------------------------------
# The three forward ops are differentiated with the two backward ops. Under create_graph=True
# (double backward: gradient penalties, higher-order methods) the backward is computed instead
# by differentiating the reference (a composition of differentiable PyTorch ops, fp32/fp64), so
# every derivative order is exact on every backend; the backward ops themselves have no
# derivative and say so when differentiated.


def _reference_vjp(reference_fn, inputs, grads):
    """Gradients of reference_fn at `inputs` against `grads`, as a differentiable graph."""
    with torch.enable_grad():
        outputs = reference_fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
    wanted = [t for t in inputs if t.requires_grad]
    found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                allow_unused=True)
    by_input = dict(zip(map(id, wanted), found))
    return tuple(by_input.get(id(t)) for t in inputs)


def _forward_backward(ops, ctx, grad_out):
    q, k, v = ctx.saved_tensors
    if torch.is_grad_enabled():
        ref = lambda a, b, c: reference.linear_attention_ref(a, b, c, ctx.eps, ctx.feature_map)  # noqa: E731
        return (*_reference_vjp(ref, (q, k, v), (grad_out,)), None, None)
    state, mean = ops.linear_attention_state(k, v, ctx.feature_map)
    grad_q, grad_state, grad_mean = ops.linear_attention_apply_backward(
        grad_out, q, state, mean, ctx.eps, ctx.feature_map)
    grad_k, grad_v = ops.linear_attention_state_backward(grad_state, grad_mean, k, v, ctx.feature_map)
    return grad_q, grad_k, grad_v, None, None


def _state_backward(ops, ctx, grad_state, grad_mean):
    k, v = ctx.saved_tensors
    if torch.is_grad_enabled():
        ref = lambda a, b: reference.linear_attention_state_ref(a, b, ctx.feature_map)  # noqa: E731
        return (*_reference_vjp(ref, (k, v), (grad_state, grad_mean)), None)
    acc = accumulation_dtype(k.dtype)
    b, _, h, dk = k.shape
    if grad_state is None:
        grad_state = k.new_zeros((b, h, dk, v.shape[-1]), dtype=acc)
    if grad_mean is None:
        grad_mean = k.new_zeros((b, h, dk), dtype=acc)
    grad_k, grad_v = ops.linear_attention_state_backward(grad_state, grad_mean, k, v, ctx.feature_map)
    return grad_k, grad_v, None


def _apply_backward(ops, ctx, grad_out):
    q, state, mean = ctx.saved_tensors
    if torch.is_grad_enabled():
        ref = lambda a, b, c: reference.linear_attention_apply_ref(a, b, c, ctx.eps, ctx.feature_map)  # noqa: E731
        return (*_reference_vjp(ref, (q, state, mean), (grad_out,)), None, None)
    grad_q, grad_state, grad_mean = ops.linear_attention_apply_backward(
        grad_out, q, state, mean, ctx.eps, ctx.feature_map)
    return grad_q, grad_state, grad_mean, None, None


def _save(names):
    """setup_context saving the tensor inputs at `names` (indices) and eps / feature_map."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in names))
        ctx.feature_map = inputs[-1]
        ctx.eps = inputs[-2] if len(inputs) == len(names) + 2 else None
    return setup


def _no_derivative(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"mmfast: {op} has no derivative of its own. For second derivatives differentiate "
                           "linear_attention / linear_attention_state / linear_attention_apply with "
                           "create_graph=True: their backward then runs through a differentiable composition.")
    return backward


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)
    register = torch.library.register_autograd
    register(f"{namespace}::linear_attention", lambda ctx, g: _forward_backward(ops, ctx, g),
             setup_context=_save((0, 1, 2)))
    register(f"{namespace}::linear_attention_state", lambda ctx, gs, gm: _state_backward(ops, ctx, gs, gm),
             setup_context=_save((0, 1)))
    register(f"{namespace}::linear_attention_apply", lambda ctx, g: _apply_backward(ops, ctx, g),
             setup_context=_save((0, 1, 2)))
    for op in ("linear_attention_apply_backward", "linear_attention_state_backward"):
        register(f"{namespace}::{op}", _no_derivative(op), setup_context=lambda ctx, inputs, output: None)


def register_fakes_and_autograd(namespace: str) -> None:
    """Registers the fake kernels and autograd of the five ops of `namespace` ("mmfast" for
    the compiled kernels, "mmfast_triton" for the Triton twins, which call this on import)."""
    for op, fake in _FAKES.items():
        torch.library.register_fake(f"{namespace}::{op}", fake)
    _register_autograd(namespace)


if _extension.loaded():
    register_fakes_and_autograd("mmfast")


# --- public API ---------------------------------------------------------------------------


def linear_attention(q, k, v, *, eps: float = 1e-4, feature_map: str = "elu1", backend: Optional[str] = None):
    """Non-causal normalised linear attention, exactly LinFusion's module (eps on the
    mean-normalised denominator).

    q, k: (B, N, H, Dk); v: (B, N, H, Dv) -> out (B, N, H, Dv), contiguous, in the input dtype.
    Token-major, as FlashAttention's: SDPA's head-major (B, H, N, D) is not detected (its sizes
    fit the same checks) and gives wrong results; pass .transpose(1, 2) of such tensors.
    out_i = phi(q_i) S / (phi(q_i) . m + eps) with S = mean_j phi(k_j)^T v_j and
    m = mean_j phi(k_j); phi = elu + 1 ("elu1"), relu ("relu") or identity ("none").
    Any strides are accepted (only a strided last dim is copied); Dk, Dv in [1, 256];
    float32/float16/bfloat16 (and float64 on the CPU, not on Triton), accumulation in fp32 (fp64 for fp64):
    the sums phi(q) . S stay below fp32's 3.4e38 only while |phi(q)| |phi(k)| |v| Dk does, which
    bf16 inputs can exceed (e.g. q, k ~ 1e4, v ~ 1e30, Dk = 128: inf where the quotient by z is
    finite; the fp64 reference is not). With eps = 0, z = phi(q) . m can be subnormal (phi(q) ~
    exp(-86)): the CPU output divides by it (finite; the CUDA fp16 / bf16 apply still multiplies
    by its overflowing reciprocal: inf), and the backward's do / z overflows fp32 past
    |do| / z > 3.4e38 (inf / NaN gradients where the fp64 reference has finite ones): keep eps > 0. Differentiable; backend: see mmfast.set_backend. When
    autograd records the call (grad mode on, an input requiring grad) it runs as
    linear_attention_state + linear_attention_apply, so the backward reuses the forward's (S, m) instead of recomputing them (one pass over k and v
    less; the fused op's backward recomputes them); otherwise as the fused op.
    Raises ValueError (shapes, feature_map, backend name), TypeError (dtypes, devices) and
    RuntimeError when no kernel runs the tensors' device.
    """
    check_tensors("linear_attention", {"q": q, "k": k, "v": v})
    q, k, v = autocast_inputs("lower", q.device, q, k, v)
    check_eps(eps)
    check_feature_map(feature_map)  # here too: the native schema would only say "expected str"
    chosen = _backend.resolve("linear_attention", q.device, backend)
    check_no_forward_transforms("linear_attention", chosen, q, k, v)
    if chosen == "reference":
        check_qkv(q, k, v, feature_map)
        return reference.linear_attention_ref(q, k, v, eps, feature_map)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        check_qkv(q, k, v, feature_map)  # the fused op's errors (q and k agree), not the two ops'
        state, mean = _backend.op_overload("linear_attention_state", chosen)(k, v, feature_map)
        return _backend.op_overload("linear_attention_apply", chosen)(q, state, mean, float(eps), feature_map)
    return _backend.op_overload("linear_attention", chosen)(q, k, v, float(eps), feature_map)


def linear_attention_state(k, v, *, feature_map: str = "elu1", backend: Optional[str] = None):
    """(B, N, H, Dk), (B, N, H, Dv) -> (S (B, H, Dk, Dv), m (B, H, Dk)), fp32 (fp64 for fp64).

    S = mean_n phi(k_n)^T v_n and m = mean_n phi(k_n), the two sums LinFusion's module divides
    (LinFusion, arXiv 2409.02097): with linear_attention_apply, the split API for tiling or
    for sharding the tokens. For a split over token shards, the exact combination is
    (sum_r N_r * S_r) / (sum_r N_r), and likewise for m. Differentiable. The feature map must be
    the one given to linear_attention_apply (not checked: S holds no record of it).
    Raises ValueError (shapes, an empty sequence, feature_map), TypeError (non-tensors, dtypes,
    devices).
    """
    check_tensors("linear_attention_state", {"k": k, "v": v})
    k, v = autocast_inputs("lower", k.device, k, v)
    check_feature_map(feature_map, "linear_attention_state")
    chosen = _backend.resolve("linear_attention_state", k.device, backend)
    check_no_forward_transforms("linear_attention_state", chosen, k, v)
    if chosen == "reference":
        check_kv(k, v, feature_map, "linear_attention_state")
        return reference.linear_attention_state_ref(k, v, feature_map)
    return _backend.op_overload("linear_attention_state", chosen)(k, v, feature_map)


def linear_attention_apply(q, state, mean, *, eps: float = 1e-4, feature_map: str = "elu1",
                           backend: Optional[str] = None):
    """out_i = phi(q_i) S / (phi(q_i) . m + eps) for q (B, N, H, Dk) and the (state, mean) of
    linear_attention_state (fp32; fp64 for fp64 q) -> (B, N, H, Dv), q's dtype. Differentiable.
    With the same feature_map and eps it equals linear_attention(q, k, v) (LinFusion's
    normalised linear attention); q may hold a different number of tokens than k and v, none
    included (an empty result, zero gradients).
    Raises ValueError (shapes, eps < 0 or not finite, feature_map), TypeError (non-tensors,
    dtypes, devices, eps not a number)."""
    check_tensors("linear_attention_apply", {"q": q, "state": state, "mean": mean})
    q, = autocast_inputs("lower", q.device, q)  # state and mean stay in the accumulation dtype
    check_eps(eps, "linear_attention_apply")
    check_feature_map(feature_map, "linear_attention_apply")
    chosen = _backend.resolve("linear_attention_apply", q.device, backend)  # a bad name raises even with no queries
    if q.dim() == 4 and q.shape[1] == 0:  # no queries (a split's empty last chunk): nothing to apply
        check_apply(q.new_empty((q.shape[0], 1, *q.shape[2:])), state, mean, feature_map, "linear_attention_apply")
        return connected(q.new_zeros((q.shape[0], 0, q.shape[2], state.shape[-1])), (q, state, mean))
    check_no_forward_transforms("linear_attention_apply", chosen, q, state, mean)
    if chosen == "reference":
        check_apply(q, state, mean, feature_map, "linear_attention_apply")
        return reference.linear_attention_apply_ref(q, state, mean, eps, feature_map)
    return _backend.op_overload("linear_attention_apply", chosen)(q, state, mean, float(eps), feature_map)
