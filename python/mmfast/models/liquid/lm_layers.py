"""LiquidLM's building blocks: RoPE (incl. Llama-3 scaling), RMSNorm (Llama / Gemma), the gated
MLP, the static KV cache and the attention / decoder layers, with transformers' module names so
its checkpoints load as they are (q/k/v and gate/up are stored fused, as qkv_proj and gate_up_proj,
behind state-dict hooks that keep transformers' names). Decode steps run on mmfast's decode ops."""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ... import _backend, ops
from .lm_config import ACTIVATIONS, LiquidLMConfig

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope", "RMSNorm", "MLP", "KVCache", "Attention", "DecoderLayer",
           "Backbone", "linear", "project", "fuse_projections", "merge_fused_projections", "DECODE_ROWS"]


# --- RoPE --------------------------------------------------------------------------------------------


def rope_inv_freq(config: LiquidLMConfig) -> torch.Tensor:
    """(head_dim / 2,) fp32 inverse frequencies on the CPU, as transformers computes them
    (compute_default_rope_parameters; _compute_llama3_parameters for "llama3" scaling)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)  # long wavelengths: / factor
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin: (B, S, D) in `dtype` for int positions (B, S) (LlamaRotaryEmbedding.forward:
    angles in fp32, cat(freqs, freqs), then cast)."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D) rotated by cos, sin (B, S, D): x * cos + rotate_half(x) * sin (apply_rotary_pos_emb)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


# --- layers ------------------------------------------------------------------------------------------

DECODE_ROWS = 16  # up to this many rows (batch x new tokens), projections stream their weights once


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear; for the few rows of a decode step (inference), mmfast.ops.decode_linear, which
    reads each weight once whatever the row count (cuBLAS on CUDA; F.linear under the Triton
    backend, which has no twin of it)."""
    few_rows = x.numel() <= DECODE_ROWS * x.shape[-1]
    differentiable = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if few_rows and not differentiable and not _triton_backend():
        return ops.decode_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@torch.compiler.assume_constant_result
def _triton_backend() -> bool:
    return _backend.get_backend() == "triton"


def project(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, layer.weight, layer.bias)


def fuse_projections(module: nn.Module, fused: str, parts: dict, in_features: int, bias: bool) -> nn.Linear:
    """One nn.Linear for several projections of the same input (parts: their transformers names ->
    output features, in order; rows stacked in that order, as vLLM's qkv_proj / gate_up_proj), so
    that a decode step streams them in one decode_linear call (fewer calls, longer streams: a
    138M Llama's q/k/v and gate/up weights take 1.10x a plain read's time at batch 1 as 2 calls,
    1.22x as 5, on 2 AMD EPYC cores). load_state_dict takes, and state_dict gives, the separate
    transformers names, so checkpoints load and save as they are; module.fused_projections
    records {fused: parts} for merge_fused_projections."""
    module.fused_projections = {**getattr(module, "fused_projections", {}), fused: dict(parts)}
    module.register_load_state_dict_pre_hook(functools.partial(_merge_parts, fused, parts))
    module.register_state_dict_post_hook(functools.partial(_split_fused, fused, parts))
    return nn.Linear(in_features, sum(parts.values()), bias=bias)


def _merge_parts(fused: str, parts: dict, module, state_dict: dict, prefix: str, *hook_args) -> None:
    """load_state_dict pre-hook: the parts' tensors, popped, concatenated under the fused name."""
    for suffix in ("weight", "bias"):
        keys = [f"{prefix}{name}.{suffix}" for name in parts]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}{fused}.{suffix}"] = torch.cat([state_dict.pop(key) for key in keys])


def _split_fused(fused: str, parts: dict, module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the fused tensor replaced by views of its parts, under their names."""
    for suffix in ("weight", "bias"):
        tensor = state_dict.pop(f"{prefix}{fused}.{suffix}", None)
        if tensor is not None:
            for name, piece in zip(parts, tensor.split(list(parts.values()))):
                state_dict[f"{prefix}{name}.{suffix}"] = piece


def merge_fused_projections(model: nn.Module, state: dict) -> None:
    """Merges a transformers state dict's separate projections into model's fused ones in place,
    module by module, so each piece is freed once merged (load_state_dict's own hooks work on a
    copy of the dict, which would keep every piece alive until loading ends: +10.6 GB for
    Liquid-7B in bf16)."""
    for name, module in model.named_modules():
        for fused, parts in getattr(module, "fused_projections", {}).items():
            _merge_parts(fused, parts, module, state, f"{name}." if name else "")


class RMSNorm(nn.Module):
    """LlamaRMSNorm: w * (x / rms(x) in fp32, cast back); with unit_offset, GemmaRMSNorm:
    ((x / rms(x)) * (1 + w), all in fp32, cast back)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (Llama, silu) or GeGLU (Gemma, tanh gelu)."""

    def __init__(self, config: LiquidLMConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = fuse_projections(self, "gate_up_proj", {"gate_proj": inner, "up_proj": inner}, hidden, bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(self.gate_up_proj, x).chunk(2, dim=-1)
        return project(self.down_proj, self.act(gate) * up)


class KVCache(nn.Module):
    """Static key / value buffers of one layer: (max_batch, max_tokens, H_kv, D) each."""

    def __init__(self, max_batch: int, max_tokens: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch, max_tokens, kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class Attention(nn.Module):
    """Causal self-attention with RoPE and GQA (LlamaAttention / GemmaAttention / Gemma2Attention).

    Two paths: attention among the S tokens of the call (prefill, or the uncached forward) with
    an explicit (B, 1, S, S) bool mask, through F.scaled_dot_product_attention, or in fp32 by
    hand when there is a softcap (SDPA has none); and decoding over the KV cache with
    mmfast.ops.kv_cache_append + mmfast.ops.decode_attention.
    """

    def __init__(self, config: LiquidLMConfig, sliding: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        hidden, bias = config.hidden_size, config.attention_bias
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = fuse_projections(self, "qkv_proj", dict(zip(("q_proj", "k_proj", "v_proj"), self.qkv_sizes)),
                                         hidden, bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=bias)
        self.scale = config.attention_scale
        self.softcap = float(config.attn_logit_softcapping or 0.0)
        self.window = int(config.sliding_window) if sliding else 0
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                cache_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, S, hidden) -> (B, S, hidden).

        mask given: attention among the S tokens (keys allowed by mask (B, 1, S, S) bool); with
        cache_seqlens also writes k, v to the cache at those lengths (prefill).
        mask None: decode: append k, v at cache_seqlens (B,) int32 (the lengths before this call)
        and attend over the cache with lengths cache_seqlens + S.
        """
        batch, seq, _ = x.shape
        q, k, v = project(self.qkv_proj, x).split(self.qkv_sizes, dim=-1)
        q = apply_rope(q.view(batch, seq, self.heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(batch, seq, self.kv_heads, self.head_dim), cos, sin)
        v = v.view(batch, seq, self.kv_heads, self.head_dim)
        if cache_seqlens is not None:
            k_cache, v_cache = self.kv_cache.k_cache[:batch], self.kv_cache.v_cache[:batch]
            ops.kv_cache_append(k_cache, v_cache, k, v, cache_seqlens)
        if mask is not None:
            out = self._attend_prompt(q, k, v, mask)
        else:
            out = ops.decode_attention(q, k_cache, v_cache, cache_seqlens + seq, scale=self.scale,
                                       softcap=self.softcap, window=self.window)
        return project(self.o_proj, out.reshape(batch, seq, self.heads * self.head_dim))

    def _attend_prompt(self, q, k, v, mask) -> torch.Tensor:
        """(B, S, H, D) x (B, S, H_kv, D) -> (B, S, H, D): softmax(scale * q k^T masked) v."""
        group = self.heads // self.kv_heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, S, D)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if not self.softcap:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:  # Gemma-2: softcap * tanh(scores / softcap) before the mask, in fp32
            scores = (q.float() @ k.float().transpose(-1, -2)) * self.scale
            scores = self.softcap * torch.tanh(scores / self.softcap)
            scores = scores.masked_fill(~mask, float("-inf"))
            out = (scores.softmax(-1) @ v.float()).to(q.dtype)
        return out.transpose(1, 2)


class DecoderLayer(nn.Module):
    """Pre-norm block: LlamaDecoderLayer / GemmaDecoderLayer, or Gemma2DecoderLayer's sandwich
    (post_attention_layernorm on the attention output, pre/post_feedforward_layernorm around the MLP)."""

    def __init__(self, config: LiquidLMConfig, sliding: bool):
        super().__init__()
        gemma, eps = config.model_type != "llama", config.rms_norm_eps
        self.sandwich = config.model_type == "gemma2"
        self.self_attn = Attention(config, sliding)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, gemma)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, gemma)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, gemma)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, gemma)

    def forward(self, x, cos, sin, mask, cache_seqlens) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_seqlens)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """transformers' `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, config: LiquidLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, sliding) for sliding in config.sliding_layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.model_type != "llama")
