"""Reference of the VQ family: nearest-codebook search and codebook lookup.

Distances are computed in fp64 whatever the input dtype, as direct differences, in chunks of
rows, so the reference never holds more than 2^24 elements (it is the oracle of the tests and
the "reference" backend, not a fast path).
Selection rule, shared with every kernel: the smallest squared Euclidean distance wins, ties
go to the lowest index, and a NaN distance never wins. A row of z whose squared norm is not
finite in fp64 (NaN or Inf anywhere, or fp64 entries past about 1e154) gets index 0 and
distance ||z||^2 (NaN or +inf), as the fp64 kernels, whose sqnorm - 2 z.e overflows there too
(the fp32 kernels' fp32 sums overflow from about 1e19, where this reference still searches:
no test goes there); a finite row whose distances are all NaN or +inf (a
codebook of non-finite codes) gets index 0 and distance +inf.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._dtypes import accumulation_dtype
from ._graph import connected

__all__ = ["VQ_METRICS", "normalized_sqnorm", "vq_quantize_ref", "vq_dequantize_ref"]

VQ_METRICS = ("l2", "cosine")
_ELEMENTS_PER_CHUNK = 2**24


_NORMALIZE_EPS = 1e-12  # F.normalize's default


def _normalized(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t.double(), dim=-1, eps=_NORMALIZE_EPS)


def normalized_sqnorm(codebook: torch.Tensor) -> torch.Tensor:
    """(K,) ||F.normalize(e)||^2 of each code without its rounding: exactly 1, or (||e|| / eps)^2
    for a code shorter than F.normalize's eps (0 for a zero code); in the codebook's dtype, no
    gradient (it is constant where it is 1). The cosine search uses it as codebook_sqnorm: the
    rounded norms of unit vectors differ by ~1e-7 (fp32) and decided exact dot-product ties (a
    zero row of z, whose every cosine is 0), against the lowest-index rule."""
    norm = torch.linalg.vector_norm(codebook.detach(), dim=-1)
    return torch.where(norm >= _NORMALIZE_EPS, torch.ones_like(norm), (norm / _NORMALIZE_EPS) ** 2)


def vq_quantize_ref(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2",
                    codebook_sqnorm: Optional[torch.Tensor] = None):
    """z (..., D), codebook (K, D) -> (indices int64 (...), squared distances (...)).

    "l2": Euclidean nearest code. "cosine": both sides l2-normalised (F.normalize), nearest by
    dot product; the distance is the squared Euclidean distance of the normalised vectors,
    ||z||^2 + 1 - 2 cos (2 - 2 cos; 1 for a zero row of z), each code's normalised squared norm
    taken as exactly 1 (normalized_sqnorm). codebook_sqnorm ("l2" only): the codes' squared
    norms to use, as the kernels do (||z||^2 + sqnorm - 2 z.e). Distances are returned in the
    accumulation dtype (fp32; fp64 for fp64).
    """
    if metric not in VQ_METRICS:
        raise ValueError(f"metric must be one of {VQ_METRICS}, got {metric!r}")
    # contiguous: a transposed z's differences would inherit its layout, and sum(-1) would then
    # round equal codes differently by their position (ties no longer to the lowest index)
    rows = z.reshape(-1, z.shape[-1]).double().contiguous()
    codes = codebook.double().contiguous()
    if metric == "cosine":
        if codebook_sqnorm is not None:
            raise ValueError("codebook_sqnorm applies to metric 'l2' only (cosine normalises the codes)")
        codebook_sqnorm = normalized_sqnorm(codes)
        rows, codes = _normalized(rows), _normalized(codes)
    code_sqnorm = None if codebook_sqnorm is None else codebook_sqnorm.double()
    indices = torch.empty(rows.shape[0], dtype=torch.int64, device=z.device)
    distances = torch.empty(rows.shape[0], dtype=torch.float64, device=z.device)
    # Direct differences (not ||z||^2 + ||e||^2 - 2 z.e, whose GEMM rounds equal codes differently
    # by their position), in chunks of rows that keep chunk x K x D under 2^24 elements.
    chunk = max(1, _ELEMENTS_PER_CHUNK // (codes.shape[0] * codes.shape[1]))
    for start in range(0, rows.shape[0], chunk):
        part = rows[start:start + chunk]
        row_sqnorm = part.pow(2).sum(-1)
        if code_sqnorm is None:
            d = (part[:, None, :] - codes[None, :, :]).pow(2).sum(-1)
        else:  # the products as direct sums too: equal codes get equal distances; >= 0 as the kernels'
            d = (row_sqnorm[:, None] + code_sqnorm[None, :] - 2 * (part[:, None, :] * codes[None, :, :]).sum(-1)
                 ).clamp_min(0)
        selectable = torch.where(d.isnan(), torch.full_like(d, float("inf")), d)
        best = selectable.argmin(dim=1)  # the first minimum: ties go to the lowest index
        distance = selectable.gather(1, best[:, None])[:, 0]
        not_finite = ~row_sqnorm.isfinite()
        indices[start:start + part.shape[0]] = best.masked_fill(not_finite, 0)
        distances[start:start + part.shape[0]] = torch.where(not_finite, row_sqnorm, distance)
    acc = accumulation_dtype(z.dtype)
    return indices.reshape(z.shape[:-1]), connected(distances, (z, codebook)).to(acc).reshape(z.shape[:-1])


def vq_dequantize_ref(indices: torch.Tensor, codebook: torch.Tensor, channels_first: bool = False):
    """Codebook rows: indices (...) -> (..., D); with channels_first, (B, h, w) -> (B, D, h, w).
    A negative index is out of range (torch indexing would wrap it around)."""
    out = codebook[torch.where(indices < 0, codebook.shape[0], indices)]
    return out.permute(0, 3, 1, 2).contiguous() if channels_first else out
