"""VQ codebook search and lookup (the image tokenizer of Liquid / Chameleon, LlamaGen's VQ):
public API, input checks, fake kernels and autograd.

Ops (schemas in csrc/registration.cpp; Triton twins in the namespace mmfast_triton):
  vq_quantize(z (N, D), codebook (K, D), codebook_sqnorm (K,)?) -> (distance (N,), indices (N,) int64)
  vq_dequantize(indices, codebook (K, D), channels_first) -> rows
The distance of vq_quantize is ||z||^2 + sqnorm[c] - 2 z . e_c of the chosen code c (the squared
Euclidean distance when sqnorm = ||e||^2, computed from the codebook when not given); the
selection rule is the reference's (mmfast.reference.vq): smallest distance, ties to the lowest
index, NaN never wins, non-finite rows of z get index 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend, _extension, reference
from .._dtypes import accumulation_dtype
from ..reference.vq import VQ_METRICS
from ._autocast import autocast_inputs
from ._checks import check_float, check_no_forward_transforms, check_same, check_tensors

__all__ = ["vq_quantize", "vq_dequantize", "vq_codebook_sqnorm"]

INDEX_DTYPES = (torch.int64, torch.int32)


# --- input checks ---------------------------------------------------------------------


def check_codebook(op: str, codebook: torch.Tensor) -> None:
    if codebook.dim() != 2:
        raise ValueError(f"{op}: codebook must be a 2-D (K, D) tensor, got shape {tuple(codebook.shape)}")
    if codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise ValueError(f"{op}: codebook must hold at least one code of at least one dim, got shape "
                         f"{tuple(codebook.shape)}")
    check_float(op, "codebook", codebook)


def check_quantize(z, codebook, codebook_sqnorm=None) -> None:
    op = "vq_quantize"
    check_codebook(op, codebook)
    if z.dim() < 1:
        raise ValueError(f"{op}: z must have at least one dim (..., D), got a 0-d tensor")
    check_float(op, "z", z)
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"{op}: z's last dim must equal the codebook's D = {codebook.shape[1]}, got z of shape "
                         f"{tuple(z.shape)}")
    check_same(op, {"z": z, "codebook": codebook}, "dtype")
    check_same(op, {"z": z, "codebook": codebook}, "device")
    if codebook_sqnorm is not None:
        acc = accumulation_dtype(codebook.dtype)
        if tuple(codebook_sqnorm.shape) != (codebook.shape[0],):
            raise ValueError(f"{op}: codebook_sqnorm must be ({codebook.shape[0]},), got "
                             f"{tuple(codebook_sqnorm.shape)}")
        if codebook_sqnorm.dtype != acc:
            raise TypeError(f"{op}: codebook_sqnorm must be {acc} for {codebook.dtype} codebooks, got "
                            f"{codebook_sqnorm.dtype} (vq_codebook_sqnorm makes it)")
        check_same(op, {"codebook": codebook, "codebook_sqnorm": codebook_sqnorm}, "device")


def check_dequantize(indices, codebook, channels_first: bool) -> None:
    op = "vq_dequantize"
    check_codebook(op, codebook)
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: indices must be int64 or int32, got {indices.dtype}")
    check_same(op, {"indices": indices, "codebook": codebook}, "device")
    if channels_first and indices.dim() != 3:
        raise ValueError(f"{op}: channels_first needs (B, h, w) indices, got shape {tuple(indices.shape)}")


def check_metric(metric: str) -> None:
    if metric not in VQ_METRICS:
        raise ValueError(f"vq_quantize: metric must be one of {VQ_METRICS}, got {metric!r}")


def check_index_range(indices: torch.Tensor, codes: int) -> None:
    """IndexError for an index outside [0, codes) (synchronises: CPU and the reference only)."""
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= codes:
        bad = low if low < 0 else high
        raise IndexError(f"vq_dequantize: index {bad} is out of range for a codebook of {codes} codes")


# --- fake kernels ----------------------------------------------------------------------


def _fake_quantize(z, codebook, codebook_sqnorm):
    check_quantize(z, codebook, codebook_sqnorm)
    if z.dim() != 2:
        raise ValueError(f"vq_quantize: the op takes z as (N, D), got shape {tuple(z.shape)}")
    n = z.shape[0]
    return z.new_empty((n,), dtype=accumulation_dtype(z.dtype)), z.new_empty((n,), dtype=torch.int64)


def _fake_dequantize(indices, codebook, channels_first):
    check_dequantize(indices, codebook, channels_first)
    d = codebook.shape[1]
    shape = (indices.shape[0], d, *indices.shape[1:]) if channels_first else (*indices.shape, d)
    return codebook.new_empty(shape)


# --- autograd: the distance is differentiable, the indices are not ------------------------


def _quantize_setup(ctx, inputs, output):
    z, codebook, codebook_sqnorm = inputs
    _, indices = output
    ctx.save_for_backward(z, codebook, indices)
    ctx.sqnorm_given = codebook_sqnorm is not None
    ctx.sqnorm_shape = None if codebook_sqnorm is None else codebook_sqnorm.shape


def _quantize_backward(ctx, grad_distance, grad_indices):
    """distance = ||z||^2 + sqnorm[c] - 2 z . e_c, sqnorm = ||e||^2 when not given."""
    z, codebook, indices = ctx.saved_tensors
    if grad_distance is None:
        return None, None, None
    g = grad_distance.to(accumulation_dtype(z.dtype))[:, None]
    chosen = codebook[indices].to(g.dtype)
    grad_z = (2 * g * (z.to(g.dtype) - chosen)).to(z.dtype)
    per_code = -2 * g * z.to(g.dtype)
    if not ctx.sqnorm_given:
        per_code = per_code + 2 * g * chosen
    # out-of-place index_add: batched gradients (vmap over grad_distance) cannot write into zeros
    grad_codebook = torch.zeros(codebook.shape, dtype=g.dtype, device=z.device).index_add(0, indices, per_code)
    grad_sqnorm = None
    if ctx.sqnorm_given:
        grad_sqnorm = torch.zeros(ctx.sqnorm_shape, dtype=g.dtype, device=z.device).index_add(0, indices, g[:, 0])
    return grad_z, grad_codebook.to(codebook.dtype), grad_sqnorm


def _dequantize_setup(ctx, inputs, output):
    indices, codebook, channels_first = inputs
    ctx.save_for_backward(indices)
    ctx.codes, ctx.channels_first = codebook.shape[0], channels_first


def _dequantize_backward(ctx, grad):
    indices, = ctx.saved_tensors
    if ctx.channels_first:
        grad = grad.permute(0, 2, 3, 1)
    rows = grad.reshape(-1, grad.shape[-1])
    grad_codebook = rows.new_zeros((ctx.codes, rows.shape[1])).index_add_(0, indices.reshape(-1).long(), rows)
    return None, grad_codebook, None


def register_fakes_and_autograd(namespace: str) -> None:
    """Fake kernels and autograd of vq_quantize and vq_dequantize in `namespace`."""
    torch.library.register_fake(f"{namespace}::vq_quantize", _fake_quantize)
    torch.library.register_fake(f"{namespace}::vq_dequantize", _fake_dequantize)
    torch.library.register_autograd(f"{namespace}::vq_quantize", _quantize_backward, setup_context=_quantize_setup)
    torch.library.register_autograd(f"{namespace}::vq_dequantize", _dequantize_backward,
                                    setup_context=_dequantize_setup)


if _extension.loaded():
    register_fakes_and_autograd("mmfast")


# --- public API ---------------------------------------------------------------------------


def vq_codebook_sqnorm(codebook: torch.Tensor) -> torch.Tensor:
    """||e_c||^2 per code, (K,) fp32 (fp64 for fp64 codebooks): compute once, pass to every
    vq_quantize call with the same codebook (metric "l2"). codebook: (K, D) float32 / float16 /
    bfloat16 / float64. Raises ValueError (not 2-D, empty), TypeError (non-tensor, dtype)."""
    check_tensors("vq_codebook_sqnorm", {"codebook": codebook})
    check_codebook("vq_codebook_sqnorm", codebook)
    return codebook.to(accumulation_dtype(codebook.dtype)).pow(2).sum(-1)


def vq_quantize(z, codebook, *, metric: str = "l2", codebook_sqnorm: Optional[torch.Tensor] = None,
                return_distance: bool = False, backend: Optional[str] = None):
    """Index of the nearest code of every vector: a fused distance + argmin over codebook tiles
    that never materialises the N x K distance matrix (taming's VectorQuantizer2 computes it).

    z: (..., D); codebook: (K, D); same float dtype (fp32, fp16, bf16; fp64 on the CPU, not on
    Triton), same device. Returns int64 indices of shape z.shape[:-1], and with
    return_distance=True also the squared distances (fp32; fp64 for fp64). metric "l2":
    Euclidean nearest code (Chameleon / Liquid's tokenizer, unnormalised codes); "cosine": both
    sides l2-normalised, nearest by dot product, distance 2 - 2 cos (LlamaGen's tokenizer; 1 for
    a zero row of z, whose cosines are all 0). The normalised codes' squared norms are taken as
    exactly 1, so a zero row's ties go to the lowest index too, not to the rounding of each norm
    (as in LlamaGen's own search); codes equal only up to scale may differ by an ulp once
    normalised, and that rounding decides between them. Products accumulate in fp32 (fp64); ties
    go to the lowest index; NaN distances never win; rows of z with NaN or Inf (or whose squared
    norm overflows) get index 0.
    codebook_sqnorm: vq_codebook_sqnorm(codebook), reusable across calls ("l2" only).
    Raises ValueError (shapes, metric), TypeError (dtypes, devices).
    """
    check_tensors("vq_quantize", {"z": z, "codebook": codebook, "codebook_sqnorm": codebook_sqnorm},
                  ("codebook_sqnorm",))
    z, codebook, codebook_sqnorm = autocast_inputs("fp32", z.device, z, codebook, codebook_sqnorm)  # as torch.cdist
    check_metric(metric)
    check_quantize(z, codebook, codebook_sqnorm)
    if metric == "cosine":
        if codebook_sqnorm is not None:
            raise ValueError("vq_quantize: codebook_sqnorm applies to metric 'l2' only (cosine normalises the codes)")
        # Normalised in the accumulation dtype and searched in it: rounding unit vectors back to
        # fp16 / bf16 would move the distances by ~1e-3.
        acc = accumulation_dtype(z.dtype)
        codebook_sqnorm = reference.normalized_sqnorm(codebook.to(acc))  # exact 1s: see there
        z, codebook = F.normalize(z.to(acc), dim=-1), F.normalize(codebook.to(acc), dim=-1)
    chosen = _backend.resolve("vq_quantize", z.device, backend)
    check_no_forward_transforms("vq_quantize", chosen, z, codebook)
    if chosen == "reference":
        indices, distance = reference.vq_quantize_ref(z, codebook, "l2", codebook_sqnorm)
    else:
        rows = z.reshape(-1, z.shape[-1])
        distance, indices = _backend.op_overload("vq_quantize", chosen)(rows, codebook, codebook_sqnorm)
        indices, distance = indices.reshape(z.shape[:-1]), distance.reshape(z.shape[:-1])
    return (indices, distance) if return_distance else indices


def vq_dequantize(indices, codebook, *, channels_first: bool = False, backend: Optional[str] = None):
    """The codebook rows of `indices`: (...) -> (..., D), or with channels_first (B, h, w) ->
    (B, D, h, w) written directly (no permute copy), in the codebook's dtype. Differentiable
    with respect to the codebook. An index outside [0, K) raises IndexError on the CPU and on
    the reference backend; on CUDA the kernel never reads out of bounds and writes a NaN row
    instead (no host synchronisation). indices: int64 or int32; codebook: (K, D) float32 /
    float16 / bfloat16 / float64 (not on Triton). The lookup of taming's VectorQuantizer2.get_codebook_entry
    (Liquid's / Chameleon's tokenizer decodes codes with it). Raises TypeError (non-tensors,
    index or codebook dtype, devices), ValueError (a codebook that is not a non-empty (K, D)
    matrix; channels_first without (B, h, w) indices), IndexError (above).
    """
    check_tensors("vq_dequantize", {"indices": indices, "codebook": codebook})
    check_dequantize(indices, codebook, channels_first)
    chosen = _backend.resolve("vq_dequantize", indices.device, backend)
    check_no_forward_transforms("vq_dequantize", chosen, codebook)
    # The native CPU kernel raises IndexError itself; the reference (any device: a CUDA index past
    # K would be a device-side assert, -1 would wrap) and the Triton interpreter are checked here
    # (a host synchronisation, skipped under torch.compile).
    if (chosen == "reference" or (chosen != "native" and indices.device.type == "cpu")) \
            and not torch.compiler.is_compiling():
        check_index_range(indices, codebook.shape[0])
    if chosen == "reference":
        return reference.vq_dequantize_ref(indices.long(), codebook, channels_first)
    return _backend.op_overload("vq_dequantize", chosen)(indices, codebook, channels_first)
