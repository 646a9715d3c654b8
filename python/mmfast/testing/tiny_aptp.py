"""Tiny random APTP experts for tests and examples: built locally, nothing downloaded.

The UNet is SD-2.1-shaped in miniature: use_linear_projection, GEGLU FFs, cross-attention at
every level but the last down one, 2 resnets per down block and 3 per up block (so every
down/up block has depth gates), and odd group sizes (24 / 48 channels, 8 GroupNorm groups:
3 and 6 channels per group; heads of 8 dims; GEGLU inner 96 / 192 = 32 groups of 3 / 6).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

TINY_APTP_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(24, 48),
    layers_per_block=2,
    cross_attention_dim=16,
    attention_head_dim=(3, 6),  # diffusers' name; these are head counts (SD 2.1: 5, 10, 20, 20)
    norm_num_groups=8,
    use_linear_projection=True,
)
TEXT_TOKENS = 8  # encoder_hidden_states length of the tiny examples


def tiny_aptp_unet(seed: int = 0, **overrides):
    """A random tiny UNet2DConditionModel (TINY_APTP_CONFIG, updated by overrides), in eval mode."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as err:
        raise ImportError("mmfast's APTP models and their tiny examples need diffusers: "
                          "pip install 'mmfast[models]' (or pip install diffusers transformers)") from err

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_APTP_CONFIG, **overrides}).eval()


@torch.no_grad()
def perturb(module: torch.nn.Module, scale: float, generator: torch.Generator) -> None:
    """Adds scale * std(p) * noise to every parameter: a stand-in for separate fine-tuning."""
    for p in module.parameters():
        noise = torch.randn(p.shape, generator=generator).to(p)
        p.add_(noise * scale * (p.float().std().item() if p.numel() > 1 else 1.0))


def tiny_experts(num_codes: int, generator: Optional[torch.Generator] = None, base=None,
                 keep: Tuple[float, float] = (0.4, 0.9), skip_depth: Sequence[float] = (0.0, 1.0, 0.5),
                 scale: float = 0.2) -> Tuple[object, List[tuple]]:
    """(base UNet, [(expert UNet, ArchitectureCode)] * num_codes): random codes (expert k skips
    each depth-gated block with probability skip_depth[k % len]: by default expert 0 runs every
    block, expert 1 skips all of them), physically sliced with prune_unet and perturbed so every
    expert has its own weights."""
    from mmfast.models.aptp import prune_unet, random_architecture

    generator = generator or torch.Generator().manual_seed(0)
    base = base if base is not None else tiny_aptp_unet()
    experts = []
    for k in range(num_codes):
        arch = random_architecture(base, keep, generator, skip_depth=skip_depth[k % len(skip_depth)])
        expert = prune_unet(base, arch)
        perturb(expert, scale, generator)
        experts.append((expert.eval(), arch))
    return base, experts


def tiny_inputs(batch: int, seed: int = 0, config=TINY_APTP_CONFIG):
    """(sample (B, 4, 8, 8), timesteps (B,), encoder_hidden_states (B, 8, 16)), seeded."""
    g = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    sample = torch.randn(batch, config["in_channels"], size, size, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, TEXT_TOKENS, config["cross_attention_dim"], generator=g)
    return sample, timesteps, text


# APTP's gated block classes (rezashkv/diffusion_pruning configs/*/sd-2-1_cc3m.yaml) by diffusers block
APTP_BLOCK_TYPES = {
    "CrossAttnDownBlock2D": "CrossAttnDownBlock2DHalfGated", "DownBlock2D": "DownBlock2DHalfGated",
    "UNetMidBlock2DCrossAttn": "UNetMidBlock2DCrossAttnWidthGated", "UpBlock2D": "UpBlock2DHalfGated",
    "CrossAttnUpBlock2D": "CrossAttnUpBlock2DHalfGated",
}


def soft_arch_vector(arch, base, generator: torch.Generator) -> torch.Tensor:
    """arch's official (1, D) vector as APTP saves it: Gumbel-sigmoid gate probabilities, kept gates
    in [0.5, 1), dropped ones in [0, 0.49)."""
    hard = arch.to_arch_vector(base)
    u = torch.rand(hard.shape, generator=generator)
    return torch.where(hard > 0, 0.5 + 0.4999 * u, 0.49 * u)


def write_released_expert(directory: str, expert, arch, base, generator: torch.Generator, step: int = 30000,
                          layout: str = "trainer") -> str:
    """Writes a sliced expert the way APTP's code (rezashkv/diffusion_pruning) leaves its fine-tuned
    experts, for loader tests; returns the weights file. layout "trainer" (the fine-tuning run's
    folder): arch_vector.pt, checkpoint-<step>/{arch_vector.pt (the trainer's copy),
    unet/{diffusion_pytorch_model.safetensors, config.json of APTP's pruned class (its gated
    block names, gated_ff, ff_gate_width)}, hypernet/diffusion_pytorch_model.safetensors (another
    model's weights under the same file name, which the loader must not take)}. layout "fid"
    (what scripts/metrics/generate_fid_images.py reads): arch_vector.pt and
    unet/diffusion_pytorch_model.safetensors, no config."""
    import json
    import os

    from safetensors.torch import save_file

    vector = soft_arch_vector(arch, base, generator)
    weights_dir = os.path.join(directory, f"checkpoint-{step}", "unet") if layout == "trainer" \
        else os.path.join(directory, "unet")
    os.makedirs(weights_dir, exist_ok=True)
    torch.save(vector, os.path.join(directory, "arch_vector.pt"))
    weights = os.path.join(weights_dir, "diffusion_pytorch_model.safetensors")
    save_file({k: v.contiguous() for k, v in expert.state_dict().items()}, weights)
    if layout == "trainer":
        checkpoint = os.path.dirname(weights_dir)
        torch.save(vector, os.path.join(checkpoint, "arch_vector.pt"))
        os.makedirs(os.path.join(checkpoint, "hypernet"), exist_ok=True)
        save_file({"mh_fc.0.weight": torch.zeros(4, 8)},
                  os.path.join(checkpoint, "hypernet", "diffusion_pytorch_model.safetensors"))
        config = dict(base.config)
        for key in ("down_block_types", "up_block_types"):
            config[key] = [APTP_BLOCK_TYPES[t] for t in config[key]]
        config["mid_block_type"] = APTP_BLOCK_TYPES[config["mid_block_type"]]
        config.update(_class_name="UNet2DConditionModelPruned", gated_ff=True, ff_gate_width=32)
        with open(os.path.join(weights_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2, default=list)
    return weights
