"""Liquid's language model: one decoder-only transformer, configured as Llama, Gemma or Gemma-2,
with a static KV cache on mmfast's decode ops (gpt-fast style).

Liquid (FoundationVision/Liquid) is a plain causal LM whose vocabulary is extended by the VQGAN's
8192 image codes (Liquid_V1_7B: Gemma-7B + 8192 rows, token 256000 + c is image code c). The
module and parameter names are transformers' (LlamaForCausalLM, GemmaForCausalLM,
Gemma2ForCausalLM: model.embed_tokens, model.layers.N.self_attn.q_proj, ..., model.norm,
lm_head), so their safetensors checkpoints load as they are:

    model = LiquidLM.from_pretrained("/path/to/Liquid_V1_7B", dtype=torch.bfloat16, device="cuda")
    model.setup_caches(max_batch=8, max_tokens=1100)
    logits = model.prefill(tokens, lengths)           # (B, V) at each row's last prompt token
    logits = model.decode_step(next_tokens[:, None])  # (B, 1, V), appends one token per row

What each family adds (transformers' classes in brackets):
  llama   RMSNorm w * x (LlamaRMSNorm), SwiGLU (hidden_act), RoPE with optional "llama3"
          rope scaling (_compute_llama3_parameters), GQA, untied or tied head.
  gemma   RMSNorm (1 + w) * x computed in fp32 (GemmaRMSNorm), GeGLU with the tanh gelu,
          embeddings scaled by sqrt(hidden) rounded to the model dtype
          (GemmaTextScaledWordEmbedding), tied head.
  gemma2  gemma + attention-logit softcap, final-logit softcap, sliding window on the layers
          config.layer_types marks "sliding_attention" (even layers by default), extra
          pre/post feed-forward norms and a post-attention norm on the attention output,
          scale query_pre_attn_scalar ** -0.5 (Gemma2Attention, Gemma2DecoderLayer).

Caches: per layer (B, T_max, H_kv, D) key and value buffers (FlashAttention's kvcache layout)
and one (B,) int32 `cache_seqlens`, the tokens held by each row. Prefill takes RIGHT-padded
prompts with per-row lengths; every row's positions start at 0 at its first token, which is
what transformers computes for a LEFT-padded batch (position_ids = attention_mask.cumsum(-1) - 1),
so results match transformers on left-padded batches without storing any padding. Decode steps
call mmfast.ops.kv_cache_append then mmfast.ops.decode_attention (compiled kernels under the
default backend).
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from .lm_checkpoint import LiquidLMCheckpointError, check_state, load_safetensors_dir
from .lm_config import ACTIVATIONS, LiquidLMConfig

__all__ = ["LiquidLM", "LiquidLMConfig", "LiquidLMCheckpointError"]

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
    reads each weight once whatever the row count (cuBLAS on CUDA)."""
    few_rows = x.numel() <= DECODE_ROWS * x.shape[-1]
    if few_rows and not (torch.is_grad_enabled() and weight.requires_grad):
        return ops.decode_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def project(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, layer.weight, layer.bias)


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
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.down_proj, self.act(project(self.gate_proj, x)) * project(self.up_proj, x))


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
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
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
        q = apply_rope(project(self.q_proj, x).view(batch, seq, self.heads, self.head_dim), cos, sin)
        k = apply_rope(project(self.k_proj, x).view(batch, seq, self.kv_heads, self.head_dim), cos, sin)
        v = project(self.v_proj, x).view(batch, seq, self.kv_heads, self.head_dim)
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


# --- the model ---------------------------------------------------------------------------------------


class LiquidLM(nn.Module):
    """Decoder-only LM (Llama / Gemma / Gemma-2) with a static KV cache on mmfast's decode ops.

    Entry points (token ids int64; logits fp32, computed in the model dtype and upcast as
    transformers' generation does, final-logit softcap in fp32):
      forward(tokens, lengths)      (B, S) -> (B, S, V) logits at every position, no cache
      prefill(tokens, lengths)      (B, S) -> (B, V) at each row's last token; fills the cache
      decode_step(tokens)           (B, S <= 16) -> (B, S, V); appends to the cache
    `tokens` are right-padded, `lengths` (B,) the real tokens per row (None: all S). Every
    method takes logits_rows=slice(start, stop): logits of those vocabulary rows only, reading
    only those rows of the head (Liquid's image codes: slice(256000, 264192)).
    """

    def __init__(self, config: LiquidLMConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.register_buffer("cache_seqlens", None, persistent=False)

    # -- properties and caches --

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def head_weight(self) -> torch.Tensor:
        """(V, hidden): lm_head.weight, or the embeddings when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def _apply(self, fn, recurse=True):
        # RoPE frequencies stay fp32 whatever the module is cast to (transformers computes them in fp32).
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def setup_caches(self, max_batch: int, max_tokens: int, dtype: Optional[torch.dtype] = None,
                     device=None) -> None:
        """Allocates per-layer (max_batch, max_tokens, H_kv, D) key / value caches (default: the
        model's dtype and device) and cache_seqlens = zeros((max_batch,), int32). Calls with fewer
        rows than max_batch use the first rows."""
        if max_batch < 1 or max_tokens < 1:
            raise ValueError(f"LiquidLM.setup_caches: max_batch and max_tokens must be >= 1, got {max_batch}, "
                             f"{max_tokens}")
        dtype, device = dtype or self.dtype, torch.device(device) if device is not None else self.device
        cfg = self.config
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, max_tokens, cfg.num_key_value_heads, cfg.head_dim, dtype,
                                               device)
        self.cache_seqlens = torch.zeros((max_batch,), dtype=torch.int32, device=device)

    def cache_shape(self) -> Optional[Tuple[int, int]]:
        """(max_batch, max_tokens) of the caches, None before setup_caches."""
        cache = self.model.layers[0].self_attn.kv_cache
        return None if cache is None else tuple(cache.k_cache.shape[:2])

    # -- the forward passes --

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 -> (B, S, hidden); Gemma multiplies by sqrt(hidden) rounded to the model dtype."""
        h = self.model.embed_tokens(tokens)
        if self.config.model_type != "llama":
            h = h * torch.tensor(self.config.hidden_size ** 0.5).to(h.dtype)
        return h

    def logits(self, hidden: torch.Tensor, logits_rows: Optional[slice] = None) -> torch.Tensor:
        """Final norm + head: (..., hidden) -> (..., rows) fp32, reading only rows `logits_rows` of the
        head weight (all when None); Gemma-2's final softcap cap * tanh(logits / cap)."""
        weight = self.head_weight
        if logits_rows is not None:
            weight = weight[_check_rows(logits_rows, weight.shape[0])]
        out = linear(self.model.norm(hidden), weight).float()
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(out / cap) if cap else out

    def _masks(self, lengths: torch.Tensor, seq: int) -> dict:
        """{window: (B, 1, S, S) bool}: key j visible to query i when j <= i, j < length and,
        with a window, i - j < window (transformers' sliding_window_overlay). A padding query
        (i >= length) sees only itself, so that padding slots stay finite (a window could leave
        it no key: NaN, which 0-weight products would carry into the real rows)."""
        i = torch.arange(seq, device=lengths.device)[:, None]
        j = torch.arange(seq, device=lengths.device)[None, :]
        real = (j[None] < lengths[:, None, None]) & (i[None] < lengths[:, None, None])  # (B, S, S)
        padding_self = (i[None] >= lengths[:, None, None]) & (j == i)[None]
        masks = {}
        for w in {layer.self_attn.window for layer in self.model.layers}:
            allowed = (j <= i) & (i - j < w) if w else j <= i
            masks[w] = ((real & allowed[None]) | padding_self)[:, None]
        return masks

    def _run(self, tokens, positions, masks, cache_seqlens) -> torch.Tensor:
        """The layers: (B, S) tokens -> (B, S, hidden) before the final norm."""
        x = self.embed(tokens)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.model.layers:
            mask = None if masks is None else masks[layer.self_attn.window]
            x = layer(x, cos, sin, mask, cache_seqlens)
        return x

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None, *,
                logits_rows: Optional[slice] = None) -> torch.Tensor:
        """Logits (B, S, V) fp32 at every position of right-padded tokens (B, S) with per-row
        lengths (B,) (None: all S); no cache. Positions of padding slots are garbage. Matches
        transformers' *ForCausalLM logits on the same prompts left-padded."""
        tokens, lengths = _check_tokens(tokens, lengths, self.device)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.logits(self._run(tokens, positions, self._masks(lengths, tokens.shape[1]), None), logits_rows)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None, *,
                logits_rows: Optional[slice] = None) -> torch.Tensor:
        """Empties the cache, runs right-padded prompts (B, S) with lengths (B,) (>= 1 each),
        writes all S keys / values per row and sets cache_seqlens[:B] = lengths (later appends
        overwrite the padding slots). Returns (B, V) fp32 logits at each row's last token."""
        tokens, lengths = _check_tokens(tokens, lengths, self.device)
        batch, seq = tokens.shape
        seqlens = self._cache_lengths(batch, seq)
        seqlens.zero_()
        positions = torch.arange(seq, device=tokens.device).expand_as(tokens)
        hidden = self._run(tokens, positions, self._masks(lengths, seq), seqlens)
        seqlens.copy_(lengths)
        last = hidden[torch.arange(batch, device=hidden.device), lengths.long() - 1]
        return self.logits(last, logits_rows)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, *, logits_rows: Optional[slice] = None) -> torch.Tensor:
        """Appends tokens (B, S), 1 <= S <= 16, after each row's cached tokens (positions
        cache_seqlens[b] + s), adds S to cache_seqlens[:B] in place; returns (B, S, V) fp32. No
        host synchronisation, nothing shape-dependent on data: CUDA-graph capturable when the
        decode ops' kernels are."""
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"LiquidLM.decode_step: tokens must be (B, S) int64, got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        batch, seq = tokens.shape
        seqlens = self._cache_lengths(batch, seq)
        positions = seqlens[:, None].long() + torch.arange(seq, device=tokens.device)
        hidden = self._run(tokens, positions, None, seqlens)
        seqlens.add_(seq)
        return self.logits(hidden, logits_rows)

    def _cache_lengths(self, batch: int, seq: int) -> torch.Tensor:
        shape = self.cache_shape()
        if shape is None:
            raise RuntimeError("LiquidLM: call setup_caches(max_batch, max_tokens) before prefill / decode_step")
        if batch > shape[0] or seq > shape[1]:
            raise ValueError(f"LiquidLM: {batch} rows of {seq} tokens do not fit caches of {shape[0]} rows x "
                             f"{shape[1]} tokens (setup_caches)")
        return self.cache_seqlens[:batch]

    # -- loading --

    @classmethod
    def from_pretrained(cls, local_dir, dtype: Optional[torch.dtype] = None, device=None) -> "LiquidLM":
        """A LiquidLM in eval mode from a local transformers checkpoint directory (nothing is
        downloaded): config.json (model_type llama, gemma or gemma2) and model.safetensors, or
        shards listed by model.safetensors.index.json, read with the safetensors library (never
        pickle). dtype: default the stored dtype; device: default CPU. A tied model ignores a stored
        lm_head.weight; rotary inv_freq keys are ignored. Raises FileNotFoundError for missing
        files, ValueError for an unsupported config, LiquidLMCheckpointError for missing,
        unexpected or misshapen tensors."""
        local_dir = os.fspath(local_dir)
        config_path = os.path.join(local_dir, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"LiquidLM: no config.json in {local_dir!r} (a local transformers checkpoint "
                                    "directory; nothing is downloaded)")
        with open(config_path) as f:
            config = LiquidLMConfig.from_hf(json.load(f))
        device = torch.device(device) if device is not None else torch.device("cpu")
        state = load_safetensors_dir(local_dir, device)
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        with torch.device("meta"):
            model = cls(config)
        check_state(model, state, local_dir)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.inv_freq = rope_inv_freq(config).to(device)
        return model.eval()


def _check_rows(rows: slice, vocab: int) -> slice:
    if not isinstance(rows, slice) or rows.step not in (None, 1):
        raise ValueError(f"LiquidLM: logits_rows must be a slice(start, stop) with step 1, got {rows!r}")
    start, stop, _ = rows.indices(vocab)
    if stop <= start or rows.stop is not None and rows.stop > vocab:
        raise ValueError(f"LiquidLM: logits_rows {rows!r} is not a non-empty range of the {vocab} vocabulary rows")
    return slice(start, stop)


def _check_tokens(tokens, lengths, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, S) int64 tokens and (B,) int32 lengths in [1, S] (all S when None), on `device`."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
        raise ValueError(f"LiquidLM: tokens must be a (B, S) int64 tensor, got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
    tokens = tokens.to(device)
    batch, seq = tokens.shape
    if lengths is None:
        return tokens, torch.full((batch,), seq, dtype=torch.int32, device=device)
    lengths = torch.as_tensor(lengths, device=device).to(torch.int32)
    if tuple(lengths.shape) != (batch,) or int(lengths.min()) < 1 or int(lengths.max()) > seq:
        raise ValueError(f"LiquidLM: lengths must be ({batch},) in [1, {seq}], got {lengths.tolist()}")
    return tokens, lengths
