"""taming-transformers' VectorQuantizer2 (the quantizer of Chameleon's and Liquid's VQGAN) on
mmfast's fused VQ ops.

Same parameters (`embedding.weight`, so taming and Chameleon state dicts load as is), same
outputs and the same loss and straight-through estimator as
CompVis/taming-transformers:taming/modules/vqvae/quantize.py `VectorQuantizer2`. The
nearest-code search is `mmfast.ops.vq_quantize` (fused distance + argmin, never the N x K
distance matrix taming builds; ties go to the lowest index, as torch.argmin), the code lookup
`mmfast.ops.vq_dequantize` (written channels-first, no permute copy). `remap` (taming's
post-hoc index remapping) is not supported.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..ops.vq import vq_dequantize, vq_quantize
from ..reference.vq import VQ_METRICS

__all__ = ["VectorQuantizer"]


class VectorQuantizer(nn.Module):
    """Discretisation bottleneck of a VQ-VAE / VQGAN: every latent vector becomes its nearest code.

    n_e: number of codes K; e_dim: code dimension D (= the latent channels C); beta: the
    commitment weight. legacy (taming's flag, default True as in taming and Chameleon): taming's
    original code put beta on the wrong term, and legacy=True keeps that:
        legacy=True:  loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)
        legacy=False: loss = beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)
    (sg = stop-gradient; the first term trains the encoder, the second the codebook.)
    metric: "l2" (taming, Chameleon, Liquid: Euclidean nearest code, unnormalised codes) or
    "cosine" (the code with the largest cosine similarity). With "cosine" only the selection
    changes: z_q is still the stored code row and the loss compares it with z as given, so for
    LlamaGen's semantics l2-normalise both the codebook and z (LlamaGen computes the loss and the
    straight-through output on the normalised z) yourself. sane_index_shape: taming's flag,
    indices as (B, H, W) instead of flat (B*H*W,).
    The codebook is initialised as taming's, uniform in [-1/n_e, 1/n_e].
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, metric: str = "l2", legacy: bool = True,
                 sane_index_shape: bool = False):
        super().__init__()
        if int(n_e) < 1 or int(e_dim) < 1:
            raise ValueError(f"VectorQuantizer: n_e and e_dim must be >= 1, got n_e={n_e}, e_dim={e_dim}")
        if metric not in VQ_METRICS:
            raise ValueError(f"VectorQuantizer: metric must be one of {VQ_METRICS}, got {metric!r}")
        self.n_e, self.e_dim, self.beta = int(n_e), int(e_dim), float(beta)
        self.metric, self.legacy, self.sane_index_shape = metric, bool(legacy), bool(sane_index_shape)
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)

    def extra_repr(self) -> str:
        return f"n_e={self.n_e}, e_dim={self.e_dim}, beta={self.beta}, metric={self.metric!r}, legacy={self.legacy}"

    # --- search and lookup ------------------------------------------------------------------

    def _check_latent(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"VectorQuantizer: z must be a tensor, got {type(z).__name__}")
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"VectorQuantizer: z must be (B, C={self.e_dim}, H, W), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"VectorQuantizer: z must be a float tensor, got {z.dtype}")

    def codes(self, z: torch.Tensor, codebook_sqnorm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Nearest-code indices of a (B, C, H, W) latent: (B, H, W) int64, no gradient.

        The search runs in the codebook's dtype (products accumulate in fp32): a latent of
        another dtype (autocast) is cast to it. taming and Chameleon compute the distances in the
        module's dtype, so with a bf16 model or under autocast they pick other codes for some
        vectors (about 1-8% in a trial; mmfast's are the nearer ones); in fp32 the indices agree.
        codebook_sqnorm: `vq_codebook_sqnorm` of the codebook, to reuse across calls (metric
        "l2" only).
        Raises ValueError / TypeError for a wrong shape or dtype.
        """
        self._check_latent(z)
        weight = self.embedding.weight.detach()
        rows = z.detach().to(weight.dtype).permute(0, 2, 3, 1)  # (B, H, W, C) view; the op copies it
        return vq_quantize(rows, weight, metric=self.metric, codebook_sqnorm=codebook_sqnorm)

    def embed_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code rows of (B, h, w) indices as a (B, C, h, w) tensor, in the codebook's dtype;
        differentiable with respect to the codebook. IndexError for codes outside [0, n_e)."""
        if indices.dim() != 3:
            raise ValueError(f"VectorQuantizer: indices must be (B, h, w), got shape {tuple(indices.shape)}")
        return vq_dequantize(_as_index_tensor(indices), self.embedding.weight, channels_first=True)

    # --- taming's interface -----------------------------------------------------------------

    def forward(self, z: torch.Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        """(z_q, loss, (perplexity, min_encodings, min_encoding_indices)), as taming's VectorQuantizer2.

        z: (B, C=e_dim, H, W) float. z_q: (B, C, H, W), values of the chosen codes and gradients
        of z (straight-through estimator z + sg[z_q - z]), in the promoted dtype of z and the
        codebook, as taming's (a bf16 z under autocast with an fp32 codebook gives fp32). loss:
        scalar in that dtype (see the class docstring). perplexity and min_encodings are None
        (VectorQuantizer2 returns None for both). min_encoding_indices: int64, flat (B*H*W,) in (B, H, W) order, or (B, H, W)
        with sane_index_shape. temp / rescale_logits / return_logits exist for interface
        compatibility with taming's GumbelQuantize and must keep their defaults (temp may also be
        1.0, which taming's VectorQuantizer2 accepts too: it changes nothing).
        Raises ValueError / TypeError for a wrong shape or dtype.
        """
        if not (temp is None or temp == 1.0) or rescale_logits or return_logits:
            raise ValueError("VectorQuantizer: temp, rescale_logits and return_logits are only for interface "
                             "compatibility with taming's GumbelQuantize and must keep their defaults")
        indices = self.codes(z)
        z_q = self.embed_codes(indices)
        z_q = z_q.to(torch.promote_types(z_q.dtype, z.dtype))  # taming's z_q - z promotes (fp32 under autocast)
        commitment = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        if self.legacy:
            loss = commitment + self.beta * codebook
        else:
            loss = self.beta * commitment + codebook
        z_q = z + (z_q - z).detach()
        if not self.sane_index_shape:
            indices = indices.reshape(-1)
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[Sequence[int]]) -> torch.Tensor:
        """taming's lookup: with shape = (B, h, w, C), indices of B*h*w codes (flat, or already
        (B, h, w)) give a (B, C, h, w) tensor; with shape None, (..., C) rows. In the codebook's
        dtype, differentiable with respect to the codebook.
        Raises ValueError when the shape does not fit the indices or C != e_dim, TypeError for
        non-integer indices, IndexError for codes outside [0, n_e).
        """
        indices = _as_index_tensor(indices)
        if shape is None:
            return vq_dequantize(indices, self.embedding.weight)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4 or shape[3] != self.e_dim:
            raise ValueError(f"VectorQuantizer.get_codebook_entry: shape must be (B, h, w, C={self.e_dim}), "
                             f"got {shape}")
        b, h, w, _ = shape
        if indices.numel() != b * h * w:
            raise ValueError(f"VectorQuantizer.get_codebook_entry: {indices.numel()} indices do not fill a "
                             f"(B, h, w) = {(b, h, w)} grid")
        return self.embed_codes(indices.reshape(b, h, w))


def _as_index_tensor(indices) -> torch.Tensor:
    """int64 / int32 tensors pass; other integer dtypes become int64; floats raise TypeError."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"VectorQuantizer: indices must be an integer tensor, got {type(indices).__name__}")
    if indices.dtype in (torch.int64, torch.int32):
        return indices
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"VectorQuantizer: indices must be an integer tensor, got {indices.dtype}")
    return indices.long()
