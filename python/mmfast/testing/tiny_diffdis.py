"""Tiny random DiffDIS models and checkpoints (official layout) for tests, examples and benchmarks."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Sequence

import torch

# stabilityai/sd-turbo scheduler/scheduler_config.json (DiffDIS loads it as a DDPMScheduler), with
# clip_sample false as in that file: shared/reference/diffdis.md measured DDPMScheduler.step at
# t = 999 equal to the unclipped x0 formula (max |diff| 0.0), and its 553 bytes are the keys below
# as diffusers 0.24 writes them.
SD_TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "sigma_max": None,
    "sigma_min": None, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "trailing",
    "timestep_type": "discrete", "trained_betas": None, "use_karras_sigmas": False,
}


def sd21_unet_config(block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
                     heads: Sequence[int] = (5, 10, 20, 20), cross_attention_dim: int = 1024,
                     layers_per_block: int = 2, norm_num_groups: int = 32) -> dict:
    """A stock SD-2.1 / sd-turbo unet/config.json (the defaults are the full-size one)."""
    return {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": list(heads),
        "block_out_channels": list(block_out_channels), "center_input_sample": False,
        "cross_attention_dim": cross_attention_dim,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
        "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": layers_per_block, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": norm_num_groups, "num_class_embeds": None, "only_cross_attention": False,
        "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "upcast_attention": False, "use_linear_projection": True,
    }


def tiny_unet_config(block_out_channels: Sequence[int] = (32, 32, 64, 64), heads: Sequence[int] = (2, 2, 4, 4),
                     cross_attention_dim: int = 32) -> dict:
    return sd21_unet_config(block_out_channels, heads, cross_attention_dim, layers_per_block=1, norm_num_groups=8)


@torch.no_grad()
def tiny_diffdis_unet(seed: int = 0, config: dict = None):
    """A random DiffDISUNet whose DiffDIS parts are all non-trivial (SWCI convs not zero, BN stats set)."""
    from mmfast.models.diffdis import DiffDISUNet

    torch.manual_seed(seed)
    unet = DiffDISUNet.from_config(config or tiny_unet_config())
    for module in list(unet.rgb_proj) + list(unet.rgb_proj1):
        torch.nn.init.normal_(module.weight, std=0.02)
        torch.nn.init.normal_(module.bias, std=0.02)
    for conv in unet.rgb_conv:
        conv[1].running_mean.normal_(0, 0.1)
        conv[1].running_var.uniform_(0.5, 1.5)
        conv[1].num_batches_tracked.fill_(100)
    return unet.eval()


def tiny_vae(seed: int = 0):
    """A random 4-level (factor 8) KL autoencoder like SD-2.1's, 8-16 channels wide."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=64,
    ).eval()


def tiny_diffdis_pipeline(seed: int = 0):
    """A random DiffDISPipeline (tiny UNet and VAE, random empty-prompt embedding)."""
    from diffusers import DDPMScheduler

    from mmfast.models.diffdis import DiffDISPipeline

    unet = tiny_diffdis_unet(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    embedding = torch.randn(1, 2, unet.config.cross_attention_dim, generator=generator)
    return DiffDISPipeline(unet, tiny_vae(seed), DDPMScheduler.from_config(SD_TURBO_SCHEDULER), embedding)


def _tiny_text_encoder(directory: str, hidden_size: int, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .tiny_diffusers import _write_tiny_tokenizer

    os.makedirs(os.path.join(directory, "tokenizer"), exist_ok=True)
    _write_tiny_tokenizer(os.path.join(directory, "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
    torch.manual_seed(seed)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()
    encoder.save_pretrained(os.path.join(directory, "text_encoder"), safe_serialization=True)


def save_tiny_diffdis_checkpoint(directory: str, seed: int = 0, text_encoder: bool = True):
    """Writes a random DiffDIS checkpoint in the released layout and returns its UNet.

    unet/ holds the STOCK config (in_channels 4, no DiffDIS options: the official instructions copy
    sd-turbo's config.json next to the weights) and the DiffDIS weights; vae/, scheduler/, and
    text_encoder/ + tokenizer/ (or, with text_encoder=False, nothing: pass an embedding file).
    """
    from safetensors.torch import save_file

    unet = tiny_diffdis_unet(seed)
    os.makedirs(os.path.join(directory, "unet"), exist_ok=True)
    with open(os.path.join(directory, "unet", "config.json"), "w") as f:
        json.dump(tiny_unet_config(), f, indent=2)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
              os.path.join(directory, "unet", "diffusion_pytorch_model.safetensors"))
    tiny_vae(seed).save_pretrained(os.path.join(directory, "vae"), safe_serialization=True)
    os.makedirs(os.path.join(directory, "scheduler"), exist_ok=True)
    with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD_TURBO_SCHEDULER, f, indent=2)
    if text_encoder:
        _tiny_text_encoder(directory, unet.config.cross_attention_dim, seed)
    return unet


def tiny_checkpoint_dir(seed: int = 0) -> tempfile.TemporaryDirectory:
    """A TemporaryDirectory holding save_tiny_diffdis_checkpoint's output (the caller cleans it up)."""
    holder = tempfile.TemporaryDirectory(prefix="mmfast-diffdis-")
    save_tiny_diffdis_checkpoint(holder.name, seed)
    return holder
