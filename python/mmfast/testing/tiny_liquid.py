"""A tiny random LiquidLM (transformers-style Llama / Gemma / Gemma-2 decoder) for tests,
examples and benchmarks."""
from __future__ import annotations

import torch

from ..models.liquid.lm import LiquidLM
from ..models.liquid.lm_config import LiquidLMConfig

__all__ = ["tiny_liquid_lm"]


def tiny_liquid_lm(model_type: str = "gemma", *, vocab_size: int = 320, seed: int = 0, **overrides) -> LiquidLM:
    """A random LiquidLM of a few thousand parameters (hidden 32, 2 layers, 4 heads of 16, 2 KV
    heads) in fp32 eval mode, e.g. 256 text tokens + 64 image codes. Weights are drawn so that
    the logits spread (distinct greedy tokens), not like a trained model."""
    fields = dict(model_type=model_type, vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  hidden_act="silu" if model_type == "llama" else "gelu_pytorch_tanh",
                  tie_word_embeddings=model_type != "llama")
    if model_type == "gemma2":
        fields.update(query_pre_attn_scalar=16.0, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      sliding_window=8, layer_types=("sliding_attention", "full_attention"))
    model = LiquidLM(LiquidLMConfig(**{**fields, **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.1 if p.dim() == 1 else 0.2))
            if p.dim() == 1 and name.endswith("norm.weight") and model_type == "llama":
                p.add_(1.0)
    return model.eval()
