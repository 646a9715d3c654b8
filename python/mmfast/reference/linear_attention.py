"""Reference of the linear-attention family (LinFusion's non-causal normalised linear attention).

It computes in fp64 whatever the input dtype, forward and (through autograd) backward: the
sums over N tokens are GEMMs over N, which drift by 1e-2 at N = 2^22 in fp32. Results are
rounded once, to the dtypes the ops return (state and mean fp32, or fp64 for fp64 inputs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dtypes import accumulation_dtype

__all__ = [
    "FEATURE_MAPS",
    "feature_map_ref",
    "linear_attention_state_ref",
    "linear_attention_apply_ref",
    "linear_attention_ref",
]

# Feature maps by id: the index is the value of mmfast::FeatureMap in
# csrc/include/mmfast/linear_attention.h, which the C++, CUDA and Triton kernels share.
FEATURE_MAPS = ("none", "elu1", "relu")


def feature_map_ref(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi(x). elu1 is elu(x) + 1 (LinFusion's), computed as exp(x) for x <= 0, as every mmfast
    kernel does: elu(x) + 1 itself cancels to 0 below x of about -37 in fp64 (-17 in fp32), which
    with eps = 0 made the reference return 0 / 0 where the kernels (exact down to about -87 in
    fp32) did not. Gradients are those of torch's elu, also for NaN (1: the gradient flows)."""
    if feature_map == "elu1":
        linear = (x > 0) | x.isnan()  # NaN on the x + 1 side: NaN value, gradient 1, as F.elu's
        below = torch.where(linear, torch.zeros_like(x), x)  # x <= 0 only: no exp overflow on the unused side
        return torch.where(linear, x + 1.0, torch.exp(below))
    if feature_map == "relu":
        return F.relu(x)
    if feature_map == "none":
        return x
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def linear_attention_state_ref(k: torch.Tensor, v: torch.Tensor, feature_map: str = "elu1"):
    """(B, N, H, Dk), (B, N, H, Dv) -> S (B, H, Dk, Dv), m (B, H, Dk), mean-normalised, returned
    in the accumulation dtype (fp32; fp64 for fp64 inputs)."""
    phi_k = feature_map_ref(k.double(), feature_map)
    n = k.shape[1]
    state = torch.einsum("bnhd,bnhe->bhde", phi_k, v.double()) / n
    mean = phi_k.sum(dim=1) / n
    acc = accumulation_dtype(k.dtype)
    return state.to(acc).contiguous(), mean.to(acc).contiguous()


def linear_attention_apply_ref(q, state, mean, eps: float = 1e-4, feature_map: str = "elu1"):
    """out_i = phi(q_i) S / (phi(q_i) . m + eps), returned in q's dtype."""
    phi_q = feature_map_ref(q.double(), feature_map)
    numerator = torch.einsum("bnhd,bhde->bnhe", phi_q, state.double())
    denominator = torch.einsum("bnhd,bhd->bnh", phi_q, mean.double()) + eps
    return (numerator / denominator.unsqueeze(-1)).to(q.dtype).contiguous()


def linear_attention_ref(q, k, v, eps: float = 1e-4, feature_map: str = "elu1"):
    """Non-causal normalised linear attention (LinFusion), layout (B, N, H, D)."""
    state, mean = linear_attention_state_ref(k, v, feature_map)
    return linear_attention_apply_ref(q, state, mean, eps, feature_map)
