"""Pure-PyTorch references shared by the tests and the benchmarks.

Every op in mmfast has exactly one reference here. References compute in fp32
(fp64 for fp64 inputs), whatever the input dtype, and return the dtype the op
returns. They are written for clarity, not speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu1", "relu", "none")


def feature_map_ref(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    if feature_map == "elu1":
        return F.elu(x) + 1.0
    if feature_map == "relu":
        return F.relu(x)
    if feature_map == "none":
        return x
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_attention_state_ref(k: torch.Tensor, v: torch.Tensor, feature_map: str = "elu1"):
    """(B, N, H, Dk), (B, N, H, Dv) -> S (B, H, Dk, Dv), m (B, H, Dk), mean-normalised."""
    acc = _accumulation_dtype(k.dtype)
    phi_k = feature_map_ref(k.to(acc), feature_map)
    n = k.shape[1]
    state = torch.einsum("bnhd,bnhe->bhde", phi_k, v.to(acc)) / n
    mean = phi_k.sum(dim=1) / n
    return state, mean


def linear_attention_apply_ref(q, state, mean, eps: float = 1e-4, feature_map: str = "elu1"):
    """out_i = phi(q_i) S / (phi(q_i) . m + eps), returned in q's dtype."""
    acc = _accumulation_dtype(q.dtype)
    phi_q = feature_map_ref(q.to(acc), feature_map)
    numerator = torch.einsum("bnhd,bhde->bnhe", phi_q, state.to(acc))
    denominator = torch.einsum("bnhd,bhd->bnh", phi_q, mean.to(acc)) + eps
    return (numerator / denominator.unsqueeze(-1)).to(q.dtype)


def linear_attention_ref(q, k, v, eps: float = 1e-4, feature_map: str = "elu1"):
    """Non-causal normalised linear attention (LinFusion), layout (B, N, H, D)."""
    state, mean = linear_attention_state_ref(k, v, feature_map)
    return linear_attention_apply_ref(q, state, mean, eps, feature_map)


def linfusion_eager_linear_attention(q, k, v, eps: float = 1e-4):
    """The formulation the official LinFusion module runs, in the input dtype.

    head_to_batch_dim copies, elu + 1, the mean of phi(k), k and v pre-scaled by
    N^-1/2, three matmuls and a divide. This is the eager baseline of the benchmarks.
    Layout in and out is (B, N, H, D), like mmfast's op.
    """
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    q = q.permute(0, 2, 1, 3).reshape(b * h, n, dk)
    k = k.permute(0, 2, 1, 3).reshape(b * h, n, dk)
    v = v.permute(0, 2, 1, 3).reshape(b * h, n, dv)
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps
    kv = (k.transpose(-2, -1) * (n**-0.5)) @ (v * (n**-0.5))
    out = q @ kv / z
    return out.reshape(b, h, n, dv).permute(0, 2, 1, 3)
