"""LinFusion's official self-attention, written as the official code runs it: the baseline
of the tests (an independent implementation of the math) and of the benchmarks (the eager
formulation mmfast replaces). Source: Huage001/LinFusion, src/linfusion/attention.py.

The official forward works on (B*H, N, D) head-to-batch copies, applies elu + 1, takes the
denominator from the mean of phi(k), pre-scales k and v by N^-1/2 (to stay inside fp16
range) and runs three matmuls and a divide, all in the input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

OFFICIAL_EPS = 1e-4


def _official_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """(B*H, Nq, D) query, (B*H, Nk, D) key and value -> (B*H, Nq, Dv), exactly the official
    sequence of ops (its N is the query count, `sequence_length` of hidden_states)."""
    n = q.shape[-2]
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps
    kv = (k.transpose(-2, -1) * (n**-0.5)) @ (v * (n**-0.5))
    return q @ kv / z


def official_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = OFFICIAL_EPS):
    """The official formulation on mmfast's (B, N, H, D) layout, in the input dtype (with the
    official head-to-batch copies in and out): the eager baseline of the benchmarks."""
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    to_batch = lambda t, d: t.permute(0, 2, 1, 3).reshape(b * h, n, d)  # noqa: E731
    out = _official_core(to_batch(q, dk), to_batch(k, dk), to_batch(v, dv), eps)
    return out.reshape(b, h, n, dv).permute(0, 2, 1, 3)


def _mlp(dim: int, mid_dim: Optional[int]) -> nn.Module:
    if mid_dim == -1:
        return nn.Identity()
    mid = mid_dim or dim
    return nn.Sequential(nn.Linear(dim, mid), nn.LayerNorm(mid), nn.LeakyReLU(0.01), nn.Linear(mid, dim))


class OfficialLinearAttention(nn.Module):
    """The official module's parameters (same state-dict keys as mmfast's
    GeneralizedLinearAttention) and forward, for (B, N, C) hidden states."""

    def __init__(self, dim_n: int, heads: int, projection_mid_dim: Optional[int] = None, eps: float = OFFICIAL_EPS):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim_n, dim_n, bias=False) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim_n, dim_n), nn.Dropout(0.0)])
        self.to_q_ = _mlp(dim_n, projection_mid_dim)
        self.to_k_ = _mlp(dim_n, projection_mid_dim)

    @classmethod
    def from_module(cls, module: nn.Module) -> "OfficialLinearAttention":
        """A copy with the weights of `module` (a GeneralizedLinearAttention)."""
        twin = cls(module.dim_n, module.heads, module.projection_mid_dim, module.eps)
        twin.load_state_dict(module.state_dict())
        return twin.to(next(module.parameters()).dtype)

    def head_to_batch_dim(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3).reshape(b * self.heads, n, -1)

    def batch_to_head_dim(self, x: torch.Tensor) -> torch.Tensor:
        bh, n, d = x.shape
        return x.reshape(bh // self.heads, self.heads, n, d).permute(0, 2, 1, 3).reshape(bh // self.heads, n, -1)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = self.head_to_batch_dim(self.to_q(hidden_states + self.to_q_(hidden_states)))
        key = self.head_to_batch_dim(self.to_k(context + self.to_k_(context)))
        value = self.head_to_batch_dim(self.to_v(context))
        out = self.batch_to_head_dim(_official_core(query, key, value, self.eps))
        return self.to_out[1](self.to_out[0](out))
