"""Tiny random diffusers models for tests and examples; built locally, nothing downloaded."""
from __future__ import annotations

import json
import os
import string
import tempfile
from typing import Sequence

import torch


def tiny_unet(block_out_channels: Sequence[int] = (32, 64), heads=2, layers_per_block: int = 1,
              cross_attention_dim: int = 32, norm_num_groups: int = 8, sample_size: int = 8, seed: int = 0):
    """A random SD-style UNet2DConditionModel: cross-attention at every level but the last down.

    heads is per level (int or tuple); diffusers calls it attention_head_dim for SD-1.5-era UNets.
    """
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=norm_num_groups,
    ).eval()


def _write_tiny_tokenizer(directory: str) -> None:
    """A character-level CLIP BPE vocabulary (no merges): enough to tokenize any ASCII prompt."""
    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77}, f)


def tiny_pipeline(seed: int = 0, block_out_channels: Sequence[int] = (32, 64)):
    """A random StableDiffusionPipeline (tiny UNet, VAE, CLIP text encoder and tokenizer)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as directory:
        _write_tiny_tokenizer(directory)
        tokenizer = CLIPTokenizer.from_pretrained(directory)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=8, sample_size=32,
    ).eval()
    unet = tiny_unet(block_out_channels, cross_attention_dim=32, seed=seed)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
