"""Input checks and fake (meta) kernels of the linear-attention ops.

Shared by every backend: the C++ ops (whose C++ glue repeats the same checks for
callers of torch.ops.mmfast.* directly) and the Triton ops. Errors name what was
expected: ValueError for shapes and values, TypeError for dtypes and devices.
"""
from __future__ import annotations

import torch

from .reference import FEATURE_MAPS

MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_token_tensor(name: str, t: torch.Tensor, layout: str) -> None:
    if t.dim() != 4:
        raise ValueError(f"linear_attention: {name} must be a 4-D {layout} tensor, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"linear_attention: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_head_dim(name: str, d: int) -> None:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"linear_attention: {name} must be in [1, {MAX_HEAD_DIM}], got {d}")


def _check_same(tensors: dict, attr: str, error=TypeError) -> None:
    values = {name: getattr(t, attr) for name, t in tensors.items()}
    if len(set(values.values())) > 1:
        described = ", ".join(f"{n}: {v}" for n, v in values.items())
        raise error(f"linear_attention: all inputs must have the same {attr}, got {described}")


def check_feature_map(feature_map: str) -> None:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"linear_attention: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def check_kv(k: torch.Tensor, v: torch.Tensor, feature_map: str):
    """Returns (B, N, H, Dk, Dv)."""
    check_feature_map(feature_map)
    _check_token_tensor("k", k, "(B, N, H, Dk)")
    _check_token_tensor("v", v, "(B, N, H, Dv)")
    _check_same({"k": k, "v": v}, "dtype")
    _check_same({"k": k, "v": v}, "device")
    b, n, h, dk = k.shape
    if tuple(v.shape[:3]) != (b, n, h):
        raise ValueError(
            f"linear_attention: k and v must agree in (B, N, H), got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if n == 0:
        raise ValueError("linear_attention: the sequence length N must be at least 1, got 0")
    _check_head_dim("Dk (k.shape[-1])", dk)
    _check_head_dim("Dv (v.shape[-1])", v.shape[-1])
    return b, n, h, dk, v.shape[-1]


def check_qkv(q, k, v, feature_map: str):
    """Returns (B, N, H, Dk, Dv); q has the same (B, N, H, Dk) as k."""
    _check_token_tensor("q", q, "(B, N, H, Dk)")
    dims = check_kv(k, v, feature_map)
    _check_same({"q": q, "k": k, "v": v}, "dtype")
    _check_same({"q": q, "k": k, "v": v}, "device")
    if tuple(q.shape) != tuple(k.shape):
        raise ValueError(
            f"linear_attention: q and k must have the same (B, N, H, Dk) shape, got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    return dims


def check_apply(q, state, mean, feature_map: str):
    """Returns (B, N, H, Dk, Dv) for linear_attention_apply."""
    check_feature_map(feature_map)
    _check_token_tensor("q", q, "(B, N, Hq, Dk)")
    b, n, h, dk = q.shape
    if n == 0:
        raise ValueError("linear_attention: the sequence length N must be at least 1, got 0")
    _check_head_dim("Dk (q.shape[-1])", dk)
    if state.dim() != 4 or tuple(state.shape[:3]) != (b, h, dk):
        raise ValueError(f"linear_attention: state must be (B, H, Dk, Dv) = ({b}, {h}, {dk}, Dv), got {tuple(state.shape)}")
    if tuple(mean.shape) != (b, h, dk):
        raise ValueError(f"linear_attention: mean must be (B, H, Dk) = ({b}, {h}, {dk}), got {tuple(mean.shape)}")
    _check_head_dim("Dv (state.shape[-1])", state.shape[-1])
    acc = accumulation_dtype(q.dtype)
    for name, t in (("state", state), ("mean", mean)):
        if t.dtype != acc:
            raise TypeError(f"linear_attention: {name} must be {acc} for {q.dtype} inputs, got {t.dtype}")
    _check_same({"q": q, "state": state, "mean": mean}, "device")
    return b, n, h, dk, state.shape[-1]


# --- fake kernels: shapes and dtypes only ------------------------------------------


def fake_linear_attention(q, k, v, eps, feature_map):
    b, n, h, _, dv = check_qkv(q, k, v, feature_map)
    return q.new_empty((b, n, h, dv))


def fake_linear_attention_state(k, v, feature_map):
    b, _, h, dk, dv = check_kv(k, v, feature_map)
    acc = accumulation_dtype(k.dtype)
    return k.new_empty((b, h, dk, dv), dtype=acc), k.new_empty((b, h, dk), dtype=acc)


def fake_linear_attention_apply(q, state, mean, eps, feature_map):
    b, n, h, _, dv = check_apply(q, state, mean, feature_map)
    return q.new_empty((b, n, h, dv))


def fake_linear_attention_apply_backward(grad_out, q, state, mean, eps, feature_map):
    check_apply(q, state, mean, feature_map)
    # Every op returns contiguous tensors, whatever the input strides.
    return q.new_empty(q.shape), state.new_empty(state.shape), mean.new_empty(mean.shape)


def fake_linear_attention_state_backward(grad_state, grad_mean, k, v, feature_map):
    check_kv(k, v, feature_map)
    return k.new_empty(k.shape), v.new_empty(v.shape)
