"""LiquidLM's configuration: the fields of a transformers Llama / Gemma / Gemma-2 config.json
that the model uses (LiquidLMConfig.from_hf reads transformers 4 and 5 spellings)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch.nn.functional as F

__all__ = ["LiquidLMConfig", "MODEL_TYPES", "ACTIVATIONS"]

MODEL_TYPES = ("llama", "gemma", "gemma2")
def gelu_tanh(x):
    """transformers' gelu_pytorch_tanh / gelu_new (a named function: a model holding it pickles)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu": F.gelu,
}


@dataclasses.dataclass(frozen=True)
class LiquidLMConfig:
    """The architecture, in transformers' config names (LlamaConfig / GemmaConfig / Gemma2Config)."""

    model_type: str = "gemma"  # "llama" | "gemma" | "gemma2"
    vocab_size: int = 264192
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    hidden_act: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    query_pre_attn_scalar: Optional[float] = None  # gemma2: scale = query_pre_attn_scalar ** -0.5
    attn_logit_softcapping: Optional[float] = None  # gemma2: 50.0
    final_logit_softcapping: Optional[float] = None  # gemma2: 30.0
    sliding_window: Optional[int] = None  # gemma2: 4096 on the "sliding_attention" layers
    layer_types: Optional[Tuple[str, ...]] = None  # per layer "full_attention" | "sliding_attention"
    max_position_embeddings: Optional[int] = None  # the trained context: generation past it warns (it runs)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LiquidLM: unsupported model_type {self.model_type!r}; supported: {MODEL_TYPES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"LiquidLM: unsupported activation {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LiquidLM: num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"LiquidLM: layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"LiquidLM: unsupported rope type {rope_type!r}; supported: default, llama3")

    @property
    def sliding_layers(self) -> Tuple[bool, ...]:
        """Per layer: does it use the sliding window?"""
        if not self.sliding_window:
            return (False,) * self.num_hidden_layers
        types = self.layer_types or ()
        return tuple(t == "sliding_attention" for t in types) or (False,) * self.num_hidden_layers

    @property
    def attention_scale(self) -> float:
        """Gemma2Attention: query_pre_attn_scalar ** -0.5; Llama / Gemma: head_dim ** -0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, config) -> "LiquidLMConfig":
        """From a transformers config (a PretrainedConfig or the dict of its config.json), for
        model_type llama, gemma or gemma2. Reads both rope formats: transformers 5's
        `rope_parameters` and transformers 4's `rope_theta` + `rope_scaling` ("type" or "rope_type").
        Raises ValueError for other model types, rope types or activations."""
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"LiquidLM: unsupported model_type {model_type!r} in the config; supported: "
                             f"{MODEL_TYPES} (Liquid's released model is a gemma)")
        if d.get("use_bidirectional_attention"):
            raise ValueError("LiquidLM: use_bidirectional_attention=True is not a causal LM")
        if "num_attention_heads" not in d:
            raise ValueError(f"LiquidLM: the config has no num_attention_heads (a transformers {model_type} "
                             "config.json names it)")
        heads = int(d["num_attention_heads"])
        gemma = model_type in ("gemma", "gemma2")
        rope = _rope_from_hf(d)
        missing = [key for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
                   if key not in d]
        if missing:
            raise ValueError(f"LiquidLM: the config has no {', '.join(missing)} (a transformers {model_type} "
                             "config.json names them all)")
        act = _activation(d, model_type)
        fields = dict(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope[0],
            rope_scaling=rope[1],
            hidden_act=act,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            max_position_embeddings=int(d["max_position_embeddings"]) if d.get("max_position_embeddings") else None,
        )
        if model_type == "gemma2":
            layers = fields["num_hidden_layers"]
            layer_types = d.get("layer_types") or [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
            fields.update(query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
                          attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0),
                          final_logit_softcapping=d.get("final_logit_softcapping", 30.0),
                          sliding_window=d.get("sliding_window", 4096), layer_types=tuple(layer_types))
        return cls(**fields)


def _activation(d: dict, model_type: str) -> str:
    """The MLP activation as transformers 5 reads it: Llama hidden_act; Gemma hidden_act (else
    hidden_activation), the legacy "gelu" run as the tanh approximation (GemmaConfig remaps it;
    released Gemma configs hold "gelu" and "gelu_pytorch_tanh": the same either way); Gemma-2
    hidden_activation as written (Gemma2MLP, no remap)."""
    if model_type == "llama":
        return d.get("hidden_act") or "silu"
    if model_type == "gemma2":
        return d.get("hidden_activation") or "gelu_pytorch_tanh"
    act = d.get("hidden_act") or d.get("hidden_activation") or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if act == "gelu" else act


def _rope_from_hf(d: dict) -> Tuple[float, Optional[dict]]:
    """(rope_theta, llama3 scaling dict or None) of a transformers 4 or 5 config dict."""
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"LiquidLM: unsupported rope type {rope_type!r}; supported: default, llama3")
    return theta, {
        "rope_type": "llama3",
        "factor": float(merged["factor"]),
        "low_freq_factor": float(merged["low_freq_factor"]),
        "high_freq_factor": float(merged["high_freq_factor"]),
        "original_max_position_embeddings": int(merged.get("original_max_position_embeddings")
                                                or d["max_position_embeddings"]),
    }
