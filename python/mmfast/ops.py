"""Public ops of mmfast, backend selection, fake kernels and autograd.

Backends of the linear-attention op:
  "native"    - the compiled C++ (CPU) and CUDA kernels, torch.ops.mmfast.*
  "triton"    - the Triton kernels, torch.ops.mmfast_triton.* (CUDA tensors; CPU
                tensors only under TRITON_INTERPRET=1, which is how tests run them)
  "reference" - the pure-PyTorch fp32 reference (mmfast.reference)
  "auto"      - "native" when the extension has a kernel for the tensors' device.

Pick one per call (backend="triton") or for a scope (mmfast.use_backend("triton")),
or globally (mmfast.set_backend("triton")).
"""
from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple, Optional

import torch

from . import _linear_attention_meta as meta
from . import reference

BACKENDS = ("auto", "native", "triton", "reference")

_state = threading.local()
_global_backend = "auto"


def set_backend(backend: str) -> None:
    """Sets the default backend of every mmfast op for this process."""
    global _global_backend
    _validate_backend(backend)
    _global_backend = backend


def get_backend() -> str:
    return getattr(_state, "backend", None) or _global_backend


@contextlib.contextmanager
def use_backend(backend: str):
    """Context manager: ops called inside use `backend` (this thread only)."""
    _validate_backend(backend)
    previous = getattr(_state, "backend", None)
    _state.backend = backend
    try:
        yield
    finally:
        _state.backend = previous


def _validate_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"mmfast: backend must be one of {BACKENDS}, got {backend!r}")


# --- the compiled ops and the Triton ops share one interface --------------------------


class LinearAttentionOps(NamedTuple):
    forward: object
    state: object
    apply: object
    apply_backward: object
    state_backward: object


def _native_ops() -> LinearAttentionOps:
    ns = torch.ops.mmfast
    return LinearAttentionOps(
        ns.linear_attention.default,
        ns.linear_attention_state.default,
        ns.linear_attention_apply.default,
        ns.linear_attention_apply_backward.default,
        ns.linear_attention_state_backward.default,
    )


def register_linear_attention_fakes(qualname_prefix: str) -> None:
    """Registers the shared fake kernels for the five ops under `qualname_prefix`."""
    fakes = {
        "linear_attention": meta.fake_linear_attention,
        "linear_attention_state": meta.fake_linear_attention_state,
        "linear_attention_apply": meta.fake_linear_attention_apply,
        "linear_attention_apply_backward": meta.fake_linear_attention_apply_backward,
        "linear_attention_state_backward": meta.fake_linear_attention_state_backward,
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"{qualname_prefix}::{name}", fake)


def register_linear_attention_autograd(qualname_prefix: str, ops: LinearAttentionOps) -> None:
    """Backward of the three forward ops, written with the two backward ops.

    The fused op saves q, k, v (not its O(B*H*D^2) state) and recomputes the state in
    backward: one extra read of k and v instead of keeping state alive between passes.
    """

    def forward_setup(ctx, inputs, output):
        q, k, v, eps, feature_map = inputs
        ctx.save_for_backward(q, k, v)
        ctx.eps, ctx.feature_map = eps, feature_map

    def forward_backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        state, mean = ops.state(k, v, ctx.feature_map)
        grad_q, grad_state, grad_mean = ops.apply_backward(grad_out, q, state, mean, ctx.eps, ctx.feature_map)
        grad_k, grad_v = ops.state_backward(grad_state, grad_mean, k, v, ctx.feature_map)
        return grad_q, grad_k, grad_v, None, None

    def state_setup(ctx, inputs, output):
        k, v, feature_map = inputs
        ctx.save_for_backward(k, v)
        ctx.feature_map = feature_map

    def state_backward(ctx, grad_state, grad_mean):
        k, v = ctx.saved_tensors
        acc = meta.accumulation_dtype(k.dtype)
        b, _, h, dk = k.shape
        if grad_state is None:
            grad_state = k.new_zeros((b, h, dk, v.shape[-1]), dtype=acc)
        if grad_mean is None:
            grad_mean = k.new_zeros((b, h, dk), dtype=acc)
        grad_k, grad_v = ops.state_backward(grad_state, grad_mean, k, v, ctx.feature_map)
        return grad_k, grad_v, None

    def apply_setup(ctx, inputs, output):
        q, state, mean, eps, feature_map = inputs
        ctx.save_for_backward(q, state, mean)
        ctx.eps, ctx.feature_map = eps, feature_map

    def apply_backward(ctx, grad_out):
        q, state, mean = ctx.saved_tensors
        grad_q, grad_state, grad_mean = ops.apply_backward(grad_out, q, state, mean, ctx.eps, ctx.feature_map)
        return grad_q, grad_state, grad_mean, None, None

    torch.library.register_autograd(
        f"{qualname_prefix}::linear_attention", forward_backward, setup_context=forward_setup
    )
    torch.library.register_autograd(
        f"{qualname_prefix}::linear_attention_state", state_backward, setup_context=state_setup
    )
    torch.library.register_autograd(
        f"{qualname_prefix}::linear_attention_apply", apply_backward, setup_context=apply_setup
    )


# --- backend resolution ----------------------------------------------------------------


def native_available(device: torch.device) -> bool:
    from . import _extension

    return torch.device(device).type in _extension.NATIVE_DEVICE_TYPES


def _triton_ops() -> LinearAttentionOps:
    from .triton import linear_attention as triton_linear_attention

    return triton_linear_attention.OPS


def _resolve(backend: Optional[str], device: torch.device) -> str:
    backend = backend or get_backend()
    _validate_backend(backend)
    if backend != "auto":
        if backend == "native" and not native_available(device):
            from . import _extension

            raise RuntimeError(
                f"mmfast: the native backend has no kernel for {device.type} tensors "
                f"({_extension.describe_missing(device)}). Use backend='triton' or backend='reference'."
            )
        return backend
    if native_available(device):
        return "native"
    from . import _extension

    raise RuntimeError(
        f"mmfast: no compiled kernel for {device.type} tensors ({_extension.describe_missing(device)}). "
        "Pass backend='triton' or backend='reference' explicitly to run a slower path."
    )


def _ops_for(backend: str) -> LinearAttentionOps:
    return _native_ops() if backend == "native" else _triton_ops()


# --- public API --------------------------------------------------------------------------


def linear_attention(q, k, v, *, eps: float = 1e-4, feature_map: str = "elu1", backend: Optional[str] = None):
    """Non-causal normalised linear attention (LinFusion).

    q, k: (B, N, H, Dk); v: (B, N, H, Dv) -> out (B, N, H, Dv) in the input dtype.
    out_i = phi(q_i) S / (phi(q_i) . m + eps) with S = mean_j phi(k_j)^T v_j and
    m = mean_j phi(k_j); phi = elu + 1 ("elu1"), relu ("relu") or identity ("none").
    Any strides are accepted; accumulation is fp32 (fp64 for fp64 inputs).
    """
    chosen = _resolve(backend, q.device)
    if chosen == "reference":
        meta.check_qkv(q, k, v, feature_map)
        return reference.linear_attention_ref(q, k, v, eps, feature_map)
    return _ops_for(chosen).forward(q, k, v, float(eps), feature_map)


def linear_attention_state(k, v, *, feature_map: str = "elu1", backend: Optional[str] = None):
    """(B, N, H, Dk), (B, N, H, Dv) -> (S (B, H, Dk, Dv), m (B, H, Dk)), fp32 (fp64 for fp64).

    S and m are means over the N tokens; for a split over token shards, the exact
    combination is (sum_r N_r * S_r) / (sum_r N_r), and likewise for m.
    """
    chosen = _resolve(backend, k.device)
    if chosen == "reference":
        meta.check_kv(k, v, feature_map)
        return reference.linear_attention_state_ref(k, v, feature_map)
    return _ops_for(chosen).state(k, v, feature_map)


def linear_attention_apply(q, state, mean, *, eps: float = 1e-4, feature_map: str = "elu1",
                           backend: Optional[str] = None):
    """out_i = phi(q_i) S / (phi(q_i) . m + eps); composes with linear_attention_state."""
    chosen = _resolve(backend, q.device)
    if chosen == "reference":
        meta.check_apply(q, state, mean, feature_map)
        return reference.linear_attention_apply_ref(q, state, mean, eps, feature_map)
    return _ops_for(chosen).apply(q, state, mean, float(eps), feature_map)
