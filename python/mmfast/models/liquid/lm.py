"""Liquid's language model: one decoder-only transformer, configured as Llama, Gemma or Gemma-2,
with a static KV cache on mmfast's decode ops (gpt-fast style).

Liquid (FoundationVision/Liquid) is a plain causal LM whose vocabulary is extended by the VQGAN's
8192 image codes (Liquid_V1_7B: Gemma-7B + 8192 rows, token 256000 + c is image code c). The
state-dict names are transformers' (LlamaForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM:
model.embed_tokens, model.layers.N.self_attn.q_proj, ..., model.norm, lm_head; q/k/v and gate/up
are held fused as qkv_proj and gate_up_proj behind state-dict hooks), so their safetensors
checkpoints load as they are:

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

import collections
import os
from typing import Optional, Tuple

import torch
from torch import nn

from ...memory import use_huge_pages
from ...ops._checks import check_dtype_argument
from ...ops.decode import MAX_DECODE_QUERIES
from .._checkpoint_files import read_json
from .lm_checkpoint import LiquidLMCheckpointError, check_state, load_safetensors_dir
from .lm_config import LiquidLMConfig
from .lm_layers import Backbone, KVCache, linear, merge_fused_projections, rope_cos_sin, rope_inv_freq

__all__ = ["LiquidLM", "LiquidLMConfig", "LiquidLMCheckpointError"]

# --- the model ---------------------------------------------------------------------------------------


def _index(device: torch.device) -> int:
    """The device's index; "cuda" without one names the current CUDA device, "cpu" the only CPU."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0


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
        self.tokens_held = 0  # the most tokens any cache row holds (host-side: no synchronisation)

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
        """Allocates per-layer (max_batch, max_tokens, H_kv, D) key / value caches and
        cache_seqlens = zeros((max_batch,), int32). Calls with fewer rows than max_batch use the
        first rows. dtype and device, if given, must be the model's (the decode ops write the
        model's keys and values into the caches as they are): ValueError otherwise; move the
        model with .to() first."""
        if max_batch < 1 or max_tokens < 1:
            raise ValueError(f"LiquidLM.setup_caches: max_batch and max_tokens must be >= 1, got {max_batch}, "
                             f"{max_tokens}")
        dtype, device = dtype or self.dtype, torch.device(device) if device is not None else self.device
        if dtype != self.dtype or device.type != self.device.type or _index(device) != _index(self.device):
            raise ValueError(f"LiquidLM.setup_caches: the caches must have the model's dtype and device "
                             f"({self.dtype}, {self.device}), got {dtype}, {device}; move the model with .to() first")
        cfg = self.config
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, max_tokens, cfg.num_key_value_heads, cfg.head_dim, dtype,
                                               self.device)
        self.cache_seqlens = torch.zeros((max_batch,), dtype=torch.int32, device=self.device)
        self.tokens_held = 0

    def __getstate__(self) -> dict:
        """Pickle / deepcopy state without the compiled decode steps (generate's compile=True),
        closures over this very model: a copy would decode on the original's weights and caches."""
        state = dict(super().__getstate__())
        state.pop("_compiled_decode_steps", None)
        return state

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
        check_token_range("LiquidLM.forward", tokens, self.config.vocab_size)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.logits(self._run(tokens, positions, self._masks(lengths, tokens.shape[1]), None), logits_rows)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None, *,
                logits_rows: Optional[slice] = None) -> torch.Tensor:
        """Empties the cache (every row: rows past B are left empty, so a later decode_step over
        them starts at position 0 rather than after an earlier prompt), runs right-padded prompts
        (B, S) with lengths (B,) (>= 1 each), writes all S keys / values per row and sets
        cache_seqlens[:B] = lengths (later appends overwrite the padding slots). Returns (B, V)
        fp32 logits at each row's last token."""
        tokens, lengths = _check_tokens(tokens, lengths, self.device)
        check_token_range("LiquidLM.prefill", tokens, self.config.vocab_size)
        batch, seq = tokens.shape
        seqlens = self._cache_lengths(batch, seq)
        self.cache_seqlens.zero_()
        positions = torch.arange(seq, device=tokens.device).expand_as(tokens)
        hidden = self._run(tokens, positions, self._masks(lengths, seq), seqlens)
        seqlens.copy_(lengths)
        self.tokens_held = seq
        last = hidden[torch.arange(batch, device=hidden.device), lengths.long() - 1]
        return self.logits(last, logits_rows)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, *, logits_rows: Optional[slice] = None) -> torch.Tensor:
        """Appends tokens (B, S), 1 <= S <= 16, after each row's cached tokens (positions
        cache_seqlens[b] + s), adds S to cache_seqlens[:B] in place; returns (B, S, V) fp32. No
        host synchronisation, nothing shape-dependent on data: CUDA-graph capturable when the
        decode ops' kernels are."""
        self.check_decode_tokens(tokens, "LiquidLM.decode_step", room=False)
        batch, seq = tokens.shape
        seqlens = self._cache_lengths(batch, seq)
        counting = not torch.compiler.is_compiling()  # compiled steps and graph replays: DecodeStep counts
        if counting:
            self.check_room(seq, "LiquidLM.decode_step")
            if tokens.device.type == "cpu":  # a bad id would fail after the count (free here; a sync on a GPU)
                check_token_range("LiquidLM.decode_step", tokens, self.config.vocab_size)
        positions = seqlens[:, None].long() + torch.arange(seq, device=tokens.device)
        hidden = self._run(tokens, positions, None, seqlens)
        seqlens.add_(seq)
        if counting:  # counted once the step ran: a refused one leaves the count as it was
            self.tokens_held += seq
        return self.logits(hidden, logits_rows)

    def hold_tokens(self, seq: int, what: str) -> None:
        """Counts seq more tokens per cache row on the host (no synchronisation); ValueError when
        the caches would overflow (on CUDA the append kernel would skip the row silently)."""
        self.check_room(seq, what)
        self.tokens_held += seq

    def check_decode_tokens(self, tokens: torch.Tensor, what: str, room: bool = True) -> None:
        """decode_step's checks on the host: ValueError for tokens that are not (B, S) int64,
        RuntimeError without caches, and (room=True) ValueError when S more tokens do not fit."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"{what}: tokens must be (B, S) int64, got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        if self.cache_shape() is None:
            raise RuntimeError("LiquidLM: call setup_caches(max_batch, max_tokens) before prefill / decode_step")
        if not 1 <= tokens.shape[1] <= MAX_DECODE_QUERIES:  # before any layer's cache is written
            raise ValueError(f"{what}: 1 to {MAX_DECODE_QUERIES} new tokens per row (S) per step, got "
                             f"{tokens.shape[1]}; use prefill for longer prompts")
        if room:
            self.check_room(tokens.shape[1], what)

    def check_room(self, seq: int, what: str) -> None:
        """ValueError unless seq more tokens per row fit in the caches (host-side count)."""
        if self.tokens_held + seq > self.cache_shape()[1]:
            raise ValueError(f"{what}: the caches hold up to {self.tokens_held} of {self.cache_shape()[1]} tokens "
                             f"per row and {seq} more do not fit: call setup_caches with a larger max_tokens")

    def _cache_lengths(self, batch: int, seq: int) -> torch.Tensor:
        shape = self.cache_shape()
        if shape is None:
            raise RuntimeError("LiquidLM: call setup_caches(max_batch, max_tokens) before prefill / decode_step")
        if batch > shape[0] or seq > shape[1]:
            raise ValueError(f"LiquidLM: {batch} rows of {seq} tokens do not fit caches of {shape[0]} rows x "
                             f"{shape[1]} tokens (setup_caches)")
        if not torch.compiler.is_compiling() and self.caches_need_inference_mode():
            raise RuntimeError("LiquidLM: the caches were made under torch.inference_mode(), and torch forbids "
                               "writing them outside it: call setup_caches again here, or run prefill / "
                               "decode_step under inference_mode (generate_text / generate_images remake them)")
        return self.cache_seqlens[:batch]

    def caches_need_inference_mode(self) -> bool:
        """True when the caches are inference tensors (made under torch.inference_mode()) and this
        call runs outside that mode, where torch refuses the in-place writes of every step."""
        return (self.cache_seqlens is not None and self.cache_seqlens.is_inference()
                and not torch.is_inference_mode_enabled())

    # -- loading --

    @classmethod
    def from_pretrained(cls, local_dir, dtype: Optional[torch.dtype] = None, device=None,
                        huge_pages: bool = True) -> "LiquidLM":
        """A LiquidLM in eval mode from a local transformers checkpoint directory (nothing is
        downloaded): config.json (model_type llama, gemma or gemma2) and model.safetensors, or
        shards listed by model.safetensors.index.json, read with the safetensors library (never
        pickle). dtype: default the stored dtype (one dtype: a checkpoint that mixes them, e.g.
        fp32 norms in a bf16 model, is cast to its config's dtype, else its most common floating
        dtype; mmfast's ops take one dtype per call); device: default CPU. huge_pages: on the CPU,
        move the weights of 2 MiB and more onto transparent huge pages
        (mmfast.memory.use_huge_pages: a decode step streams them all, 4-19% faster on huge
        pages; no effect off Linux, without THP or with MMFAST_CPU_HUGE_PAGES=0). A tied model
        ignores a stored lm_head.weight; rotary inv_freq keys are ignored. Raises
        FileNotFoundError for missing files, ValueError for an unsupported config or a config.json
        that is not JSON, LiquidLMCheckpointError for a weights file that is not readable
        safetensors (e.g. truncated) and for missing, unexpected or misshapen tensors."""
        check_dtype_argument("LiquidLM.from_pretrained", "dtype", dtype)
        local_dir = os.fspath(local_dir)
        config_path = os.path.join(local_dir, "config.json")
        if not os.path.isdir(local_dir):
            raise FileNotFoundError(f"LiquidLM: {local_dir!r} is not a directory: from_pretrained reads a local "
                                    "transformers checkpoint folder, never a Hugging Face Hub id (download one first, "
                                    "e.g. huggingface_hub.snapshot_download(repo_id, local_dir=...))")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"LiquidLM: no config.json in {local_dir!r} (a local transformers checkpoint "
                                    "directory; nothing is downloaded)")
        config_dict = read_json(config_path, "LiquidLM")
        config = LiquidLMConfig.from_hf(config_dict)
        device = torch.device(device) if device is not None else torch.device("cpu")
        state = load_safetensors_dir(local_dir, device)
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        with torch.device("meta"):
            model = cls(config)
        check_state(model, state, local_dir)
        dtype = dtype if dtype is not None else _one_dtype(state, config_dict)
        cast_in_place(state, dtype)
        merge_fused_projections(model, state)
        model.load_state_dict(state, strict=True, assign=True)
        model.inv_freq = rope_inv_freq(config).to(device)
        if huge_pages and device.type == "cpu":
            use_huge_pages(model)
        return model.eval()


def cast_in_place(state: dict, dtype: torch.dtype) -> None:
    """Casts the floating tensors of `state` to dtype one at a time, each stored tensor released
    before the next is cast: the peak is the state plus its largest tensor, not two states (a 7B
    checkpoint stored in bf16 and loaded in fp16 would otherwise hold 28 GB for 14)."""
    for key in list(state):
        if state[key].is_floating_point():
            state[key] = state[key].to(dtype)


def _one_dtype(state: dict, config: dict) -> torch.dtype:
    """The stored floating dtype; for a checkpoint that mixes several, its config's dtype
    ("torch_dtype" / "dtype", as transformers loads it), else the most common one by bytes."""
    stored = collections.Counter()
    for tensor in state.values():
        if tensor.is_floating_point():
            stored[tensor.dtype] += tensor.numel() * tensor.element_size()
    if len(stored) <= 1:
        return next(iter(stored), torch.float32)
    named = config.get("torch_dtype") or config.get("dtype")
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        return getattr(torch, named)
    return stored.most_common(1)[0][0]


def _check_rows(rows: slice, vocab: int) -> slice:
    if not isinstance(rows, slice) or rows.step not in (None, 1):
        raise ValueError(f"LiquidLM: logits_rows must be a slice(start, stop) with step 1, got {rows!r}")
    start, stop, _ = rows.indices(vocab)
    if stop <= start or rows.stop is not None and rows.stop > vocab:
        raise ValueError(f"LiquidLM: logits_rows {rows!r} is not a non-empty range of the {vocab} vocabulary rows")
    return slice(start, stop)


def check_token_range(what: str, tokens: torch.Tensor, vocab_size: int) -> None:
    """ValueError for ids outside [0, vocab_size) (the embedding would raise a bare IndexError).
    Reads the ids' min and max (a host synchronisation on a GPU: prompts only, never per step)."""
    if tokens.numel():
        low, high = (int(x) for x in torch.aminmax(tokens))
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{what}: token ids must be in [0, {vocab_size}) (the model's vocabulary), got ids in "
                             f"[{low}, {high}]")


def _check_tokens(tokens, lengths, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, S) int64 tokens and (B,) int32 lengths in [1, S] (all S when None), on `device`."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
        raise ValueError(f"LiquidLM: tokens must be a (B, S) int64 tensor, got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
    tokens = tokens.to(device)
    batch, seq = tokens.shape
    if lengths is None:
        return tokens, torch.full((batch,), seq, dtype=torch.int32, device=device)
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"LiquidLM: lengths must be integers (token counts), got {lengths.dtype}")
    lengths = lengths.to(torch.int32)
    if tuple(lengths.shape) != (batch,) or int(lengths.min()) < 1 or int(lengths.max()) > seq:
        raise ValueError(f"LiquidLM: lengths must be ({batch},) in [1, {seq}], got {lengths.tolist()}")
    return tokens, lengths
