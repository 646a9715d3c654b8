"""Exact token-parallel linear attention on torch.distributed.

Each rank holds a slice of the tokens (any sizes). The op's state is a mean over
tokens, so the global state is sum_r N_r * S_r / sum_r N_r (likewise m): one all-reduce
of an fp32 buffer of B*H*(Dk*Dv + Dk) + 1 numbers, whatever N is. Each rank then
applies the global state to its own queries. The result equals the single-process op.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import ops


def all_reduce_sum(buffer: torch.Tensor, group) -> torch.Tensor:
    """In-place SUM all-reduce over `group`; returns the buffer."""
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer


class _GlobalMeanState(torch.autograd.Function):
    """(S_r, m_r) -> (sum_r N_r S_r / N, sum_r N_r m_r / N), differentiable.

    Backward: every rank's loss depends on the global state, so dL/dS_r =
    (N_r / N) * sum_r' dL_r'/dS: the incoming gradients are all-reduced, then scaled.
    """

    @staticmethod
    def forward(ctx, state, mean, tokens: int, group):
        buffer = torch.cat([
            state.reshape(-1) * tokens,
            mean.reshape(-1) * tokens,
            state.new_full((1,), float(tokens)),
        ])
        buffer = all_reduce_sum(buffer, group)
        total = buffer[-1]
        ctx.group, ctx.weight = group, tokens / total  # a tensor: no device sync
        ctx.state_shape, ctx.mean_shape = state.shape, mean.shape
        global_state = (buffer[: state.numel()] / total).view(state.shape)
        global_mean = (buffer[state.numel(): -1] / total).view(mean.shape)
        return global_state, global_mean

    @staticmethod
    def backward(ctx, grad_state, grad_mean):
        grad_state = _zeros_if_none(grad_state, ctx.state_shape, grad_mean)
        grad_mean = _zeros_if_none(grad_mean, ctx.mean_shape, grad_state)
        buffer = torch.cat([grad_state.reshape(-1), grad_mean.reshape(-1)]).contiguous()
        buffer = all_reduce_sum(buffer, ctx.group) * ctx.weight
        split = grad_state.numel()
        return buffer[:split].view(ctx.state_shape), buffer[split:].view(ctx.mean_shape), None, None


def _zeros_if_none(grad, shape, like):
    # Every rank must join the backward all-reduce, even one whose loss ignored a part.
    return like.new_zeros(shape) if grad is None else grad


def global_linear_attention_state(k, v, *, feature_map: str = "elu1", group=None, backend: Optional[str] = None):
    """(S, m) of all ranks' tokens together (every rank gets the same), differentiable. A rank may
    hold no tokens (N_r = 0: more ranks than tokens in a split) and still joins the all-reduce."""
    if all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == 0 for t in (k, v)):
        state, mean = _no_token_state(k, v, feature_map, backend)
    else:
        state, mean = ops.linear_attention_state(k, v, feature_map=feature_map, backend=backend)
    return _GlobalMeanState.apply(state, mean, k.shape[1], group)


def _no_token_state(k, v, feature_map, backend):
    """A rank without tokens adds nothing: zero (S, m) in the op's accumulation dtype, still in k's
    and v's graph (the op refuses N = 0, and raising on one rank would leave the others waiting in
    the all-reduce). The op's other checks run as on the other ranks: a bad input raises on every
    rank before the collective."""
    from . import _backend
    from ._dtypes import accumulation_dtype
    from .ops.linear_attention import check_kv
    from .reference._graph import connected

    _backend.resolve("linear_attention_state", k.device, backend)
    check_kv(k.new_empty((k.shape[0], 1, *k.shape[2:])), v.new_empty((v.shape[0], 1, *v.shape[2:])),
             feature_map, "mmfast.distributed.linear_attention")  # on one-token stand-ins
    b, _, h, dk = k.shape
    acc = accumulation_dtype(k.dtype)
    return (connected(k.new_zeros((b, h, dk, v.shape[-1]), dtype=acc), (k, v)),
            connected(k.new_zeros((b, h, dk), dtype=acc), (k, v)))


def linear_attention(q, k, v, *, eps: float = 1e-4, feature_map: str = "elu1", group=None,
                     backend: Optional[str] = None):
    """mmfast.ops.linear_attention over the tokens of every rank of `group`.

    q, k, v: this rank's (B, N_r, H, D) slices (same B, H, D on every rank; N_r may differ;
    q and k/v of a rank are the same tokens). Returns this rank's (B, N_r, H, Dv) output
    slice, equal to the matching slice of the single-process result. Backward is exact as
    well (every rank must call backward, as with any collective).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("mmfast.distributed.linear_attention: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    state, mean = global_linear_attention_state(k, v, feature_map=feature_map, group=group, backend=backend)
    return ops.linear_attention_apply(q, state, mean, eps=eps, feature_map=feature_map, backend=backend)
