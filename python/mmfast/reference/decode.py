"""Reference of the decode family: KV-cache append, decode attention, the fused sampler.

The rules (shared with every kernel; csrc/include/mmfast/decode.h states them for C++):
- Caches are (B, T_max, H_kv, D); row b holds cache_seqlens[b] valid tokens.
- kv_cache_append writes the S new tokens of row b to slots [len_b, len_b + S), len_b being
  the length before the append.
- decode_attention: cache_seqlens includes the Sq new tokens; query i of row b sits at
  position p = len_b - Sq + i and attends keys j <= p (and p - j < window when window > 0);
  query head h reads KV head h // (H // H_kv); scores are scale * q.k, soft-capped as
  softcap * tanh(s / softcap) when softcap > 0 (Gemma-2). Computed here in fp64.
- sample: CFG mix u + scale * (c - u) (Liquid's formula; cond rows first), then
  temperature (0: argmax, lowest index on ties), top-k (transformers' TopKLogitsWarper: ties
  with the k-th value kept), top-p (transformers' TopPLogitsWarper: the smallest set reaching
  top_p, the threshold-crossing token kept; ties of a kept value all kept; the largest value
  always kept), then an inverse-CDF draw in index order with the caller's uniform u in [0, 1).
  Logits are mixed and scaled in fp32, the way the kernels do; the filter and the draw run in
  fp64 here.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["kv_cache_append_ref", "decode_attention_ref", "sample_probs_ref", "sample_ref", "cfg_mix_ref",
           "invalid_logit_rows", "decode_linear_ref"]


def kv_cache_append_ref(k_cache, v_cache, k, v, cache_seqlens) -> None:
    """In place: k_cache[b, len_b + s] = k[b, s] (and v), for every row b and new token s."""
    new_tokens = k.shape[1]
    for b, length in enumerate(cache_seqlens.tolist()):
        k_cache[b, length:length + new_tokens] = k[b]
        v_cache[b, length:length + new_tokens] = v[b]


def attention_mask_ref(length: int, queries: int, window: Optional[int], device=None) -> torch.Tensor:
    """(Sq, length) bool: which cached keys each new query of a row attends."""
    positions = torch.arange(length - queries, length, device=device)[:, None]
    keys = torch.arange(length, device=device)[None, :]
    allowed = keys <= positions
    if window:
        allowed &= positions - keys < window
    return allowed


def decode_attention_ref(q, k_cache, v_cache, cache_seqlens, scale: Optional[float] = None, softcap: float = 0.0,
                         window: Optional[int] = None) -> torch.Tensor:
    """q (B, Sq, H, D), caches (B, T_max, H_kv, D), cache_seqlens (B,) -> (B, Sq, H, D) in q's dtype."""
    batch, queries, heads, dim = q.shape
    group = heads // k_cache.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous like the kernels', whatever q's strides
    for b, length in enumerate(cache_seqlens.tolist()):
        qb = q[b].double().transpose(0, 1)                                            # (H, Sq, D)
        kb = k_cache[b, :length].double().transpose(0, 1).repeat_interleave(group, 0)  # (H, L, D)
        vb = v_cache[b, :length].double().transpose(0, 1).repeat_interleave(group, 0)
        scores = scale * qb @ kb.transpose(1, 2)
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        mask = attention_mask_ref(length, queries, window, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[b] = (scores.softmax(-1) @ vb).transpose(0, 1).to(q.dtype)
    return out


def cfg_mix_ref(logits: torch.Tensor, cfg_scale: Optional[float]) -> torch.Tensor:
    """fp32 logits of the rows sampled: with CFG, uncond + scale * (cond - uncond) of the pairs
    (rows [0, P) conditional, [P, 2P) unconditional), exactly Liquid's expression."""
    logits = logits.float()
    if cfg_scale is None:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (cond - uncond) * cfg_scale


def invalid_logit_rows(x: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: rows the sampler rejects (a NaN or +inf, or every entry -inf)."""
    return x.isnan().any(-1) | (x == float("inf")).any(-1) | (x == float("-inf")).all(-1)


def sample_probs_ref(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     cfg_scale: Optional[float] = None) -> torch.Tensor:
    """The distribution the sampler draws from, (P, V) fp64 (rows of invalid logits are NaN).
    temperature 0 puts all mass on the argmax."""
    weights = kept_weights_ref(logits, temperature, top_k, top_p, cfg_scale)
    return weights / weights.sum(-1, keepdim=True)


def kept_weights_ref(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     cfg_scale: Optional[float] = None) -> torch.Tensor:
    """(P, V) fp64: the kept tokens' exp(x / T - max), 0 elsewhere, unnormalised as the kernels
    hold them (1 on the argmax at temperature 0; NaN rows for invalid logits)."""
    x = cfg_mix_ref(logits, cfg_scale)
    invalid = invalid_logit_rows(x)
    temperature = max(temperature, 1e-5) if temperature > 0 else 0.0  # ops.decode.MIN_TEMPERATURE
    if temperature == 0:
        probs = torch.zeros_like(x, dtype=torch.float64)
        probs.scatter_(1, x.argmax(-1, keepdim=True), 1.0)  # torch.argmax: the first maximal index
        probs[invalid] = float("nan")
        return probs
    x = (x / temperature).double()
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = x.topk(top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = (x - x.max(-1, keepdim=True).values).exp()
    if top_p < 1:
        ordered, order = x.sort(dim=-1, descending=True)
        weights = probs.gather(1, order)
        total = weights.sum(-1, keepdim=True)
        inclusive = weights.cumsum(-1)
        # mass of strictly larger values: the inclusive sum before the first entry of each tie group
        first_of_group = torch.ones_like(ordered, dtype=torch.bool)
        first_of_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        before = torch.where(first_of_group, inclusive - weights, torch.zeros_like(weights))
        group_start = torch.cummax(torch.where(first_of_group, torch.arange(vocab, device=x.device),
                                               torch.zeros_like(order)), dim=-1).values
        above = before.gather(1, group_start)
        keep_sorted = (above < top_p * total) | (group_start == 0)
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        probs = probs.masked_fill(~keep, 0.0)
    probs[invalid] = float("nan")
    return probs


def sample_ref(logits, uniform, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               cfg_scale: Optional[float] = None) -> torch.Tensor:
    """(P,) int64 tokens drawn from sample_probs_ref by inverse CDF in index order: the smallest
    i whose running sum of kept weights exceeds u * total (mmfast/decode.h), over the unnormalised
    weights: normalised first, a total of 6 became 0.9999999999999999 and a target on a running
    sum (ties, u = 0.5) moved to the token before. Invalid rows give token 0."""
    probs = kept_weights_ref(logits, temperature, top_k, top_p, cfg_scale)
    invalid = probs.isnan().any(-1)
    probs = torch.nan_to_num(probs, nan=0.0)
    running = probs.cumsum(-1)
    target = uniform.double()[:, None] * running[:, -1:]
    last_kept = (probs > 0).long().cumsum(-1).argmax(-1)  # a u that rounds past the total
    tokens = torch.minimum((running <= target).sum(-1), last_kept)
    return torch.where(invalid, torch.zeros_like(tokens), tokens)


def decode_linear_ref(x, weight, bias=None) -> torch.Tensor:
    """F.linear computed in fp64, returned in x's dtype."""
    out = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return out.to(x.dtype)
