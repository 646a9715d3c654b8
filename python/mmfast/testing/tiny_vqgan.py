"""Tiny random taming-format VQGANs (Chameleon / Liquid tokenizer layout) for tests and examples.

`taming_vqgan_shapes` lists the state-dict keys and shapes that taming-transformers' VQModel
creates for a config, written in taming's own construction order
(CompVis/taming-transformers:taming/modules/diffusionmodules/model.py, Encoder / Decoder
__init__) and independently of mmfast.models.liquid, so the tests can check key compatibility
against it. `write_taming_checkpoint` saves a random state dict with those keys plus some
training-only "loss.*" keys, as .safetensors and as a weights_only-loadable Lightning-style .ckpt.
Nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Tuple

import torch

from ..models.liquid import VQGAN, VQGANConfig

__all__ = ["tiny_vqgan_config", "taming_vqgan_shapes", "random_taming_state_dict", "write_taming_checkpoint",
           "tiny_vqgan"]

# A few keys of taming's VQLPIPSWithDiscriminator: present in real checkpoints, unused at inference.
LOSS_KEY_SHAPES = {
    "loss.perceptual_loss.net.slice1.0.weight": (64, 3, 3, 3),
    "loss.perceptual_loss.lin0.model.1.weight": (1, 64, 1, 1),
    "loss.discriminator.main.0.weight": (64, 3, 4, 4),
    "loss.discriminator.main.0.bias": (64,),
}


def tiny_vqgan_config(**overrides) -> VQGANConfig:
    """ch 32, ch_mult (1, 2) (one downsample: 32 x 32 images -> 16 x 16 codes), 1 res block per
    level, attention at the lowest resolution (16), z_channels = embed_dim = 16, 64 codes."""
    base = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=16,
                       embed_dim=16, n_embed=64, resolution=32)
    return dataclasses.replace(base, **overrides)


def taming_vqgan_shapes(cfg: VQGANConfig) -> Dict[str, Tuple[int, ...]]:
    """{state-dict key: shape} of taming's VQModel(ddconfig, n_embed, embed_dim) for cfg."""
    shapes: Dict[str, Tuple[int, ...]] = {}

    def conv(name, c_in, c_out, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, c_in, c_out):
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    def attn(name, c):
        if cfg.attn_type == "vanilla":
            norm(f"{name}.norm", c)
            for proj in ("q", "k", "v", "proj_out"):
                conv(f"{name}.{proj}", c, c, 1)

    def middle(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c)
        attn(f"{prefix}.mid.attn_1", c)
        resnet(f"{prefix}.mid.block_2", c, c)

    levels = len(cfg.ch_mult)
    conv("encoder.conv_in", cfg.in_channels, cfg.ch, 3)
    curr_res, in_ch_mult = cfg.resolution, (1,) + tuple(cfg.ch_mult)
    for i_level in range(levels):
        block_in, block_out = cfg.ch * in_ch_mult[i_level], cfg.ch * cfg.ch_mult[i_level]
        for i_block in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{i_level}.block.{i_block}", block_in, block_out)
            block_in = block_out
            if curr_res in cfg.attn_resolutions:
                attn(f"encoder.down.{i_level}.attn.{i_block}", block_in)
        if i_level != levels - 1:
            if cfg.resamp_with_conv:
                conv(f"encoder.down.{i_level}.downsample.conv", block_in, block_in, 3)
            curr_res //= 2
    middle("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, cfg.z_channels, 3)

    block_in, curr_res = cfg.ch * cfg.ch_mult[-1], cfg.resolution // 2 ** (levels - 1)
    conv("decoder.conv_in", cfg.z_channels, block_in, 3)
    middle("decoder", block_in)
    for i_level in reversed(range(levels)):
        block_out = cfg.ch * cfg.ch_mult[i_level]
        for i_block in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{i_level}.block.{i_block}", block_in, block_out)
            block_in = block_out
            if curr_res in cfg.attn_resolutions:
                attn(f"decoder.up.{i_level}.attn.{i_block}", block_in)
        if i_level != 0:
            if cfg.resamp_with_conv:
                conv(f"decoder.up.{i_level}.upsample.conv", block_in, block_in, 3)
            curr_res *= 2
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, cfg.out_ch, 3)

    conv("quant_conv", cfg.z_channels, cfg.embed_dim, 1)
    conv("post_quant_conv", cfg.embed_dim, cfg.z_channels, 1)
    shapes["quantize.embedding.weight"] = (cfg.n_embed, cfg.embed_dim)
    return shapes


def _random_tensor(name: str, shape, generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator)
    if name == "quantize.embedding.weight":
        return values * 0.5  # about the scale of a random encoder's latents, so many codes get used
    if len(shape) == 4:  # conv weight: unit-variance outputs for unit-variance inputs
        return values / (shape[1] * shape[2] * shape[3]) ** 0.5
    is_norm = ".norm" in name
    if name.endswith(".weight") and is_norm:
        return 1.0 + 0.1 * values
    return 0.1 * values if is_norm else 0.02 * values


def random_taming_state_dict(cfg: VQGANConfig, seed: int = 0, loss_keys: bool = True) -> Dict[str, torch.Tensor]:
    """Random fp32 tensors under taming's keys (plus "loss.*" keys when loss_keys), seeded."""
    generator = torch.Generator().manual_seed(seed)
    shapes = dict(taming_vqgan_shapes(cfg))
    if loss_keys:
        shapes.update(LOSS_KEY_SHAPES)
    return {name: _random_tensor(name, shape, generator) for name, shape in shapes.items()}


def write_taming_checkpoint(directory, cfg: Optional[VQGANConfig] = None, seed: int = 0) -> Tuple[str, str]:
    """Write `vqgan.safetensors` (the flat state dict) and `vqgan.ckpt` (a Lightning-style
    {"state_dict": ..., "global_step": 0, "epoch": 0}, loadable with weights_only=True) into
    directory; both hold the same random taming state dict with "loss.*" keys. Returns both paths."""
    from safetensors.torch import save_file

    state = random_taming_state_dict(cfg if cfg is not None else tiny_vqgan_config(), seed)
    os.makedirs(directory, exist_ok=True)
    safetensors_path = os.path.join(directory, "vqgan.safetensors")
    ckpt_path = os.path.join(directory, "vqgan.ckpt")
    save_file(state, safetensors_path)
    torch.save({"state_dict": state, "global_step": 0, "epoch": 0}, ckpt_path)
    return safetensors_path, ckpt_path


def tiny_vqgan(seed: int = 0, config: Optional[VQGANConfig] = None, **overrides) -> VQGAN:
    """A VQGAN of `config` (default tiny_vqgan_config(**overrides)) holding the random taming state
    dict of `seed`, fp32, in eval mode."""
    cfg = config if config is not None else tiny_vqgan_config(**overrides)
    state = random_taming_state_dict(cfg, seed, loss_keys=False)
    model = VQGAN(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()
