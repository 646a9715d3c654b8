"""taming-transformers' convolutional VQGAN body (CompVis/taming-transformers:
taming/modules/diffusionmodules/model.py, as copied by facebookresearch/chameleon:
chameleon/inference/vqgan.py): the `ddconfig` as a dataclass, and Encoder / Decoder with taming's
module names, which are the state-dict keys (encoder.down.{i}.block.{j}.conv1, ...).

Differences from taming, none changing a result beyond rounding: attention runs through
F.scaled_dot_product_attention, GroupNorm normalises fp16/bf16 activations in fp32, and the
unused timestep-embedding path is left out (taming's VQGAN has temb_ch = 0).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VQGANConfig", "Encoder", "Decoder", "ResnetBlock", "AttnBlock", "Downsample", "Upsample", "GroupNorm"]


@dataclass(frozen=True)
class VQGANConfig:
    """taming's `ddconfig` plus the quantizer sizes; the defaults are Chameleon's tokenizer (as used
    by Liquid; values from HF transformers' ChameleonVQVAEConfig, converted from Meta's yaml).

    attn_resolutions: feature-map sizes (of the configured `resolution`) whose res blocks get an
    attention block; () for Chameleon is unverified (Meta's vqgan.yaml ships with the weights and
    was not checked; HF's ChameleonVQVAEConfig default is None). The middle blocks always have attention unless attn_type is "none".
    """

    ch: int = 128
    out_ch: int = 3
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = ()
    dropout: float = 0.0
    resamp_with_conv: bool = True
    in_channels: int = 3
    resolution: int = 512
    z_channels: int = 256
    double_z: bool = False
    embed_dim: int = 256
    n_embed: int = 8192
    beta: float = 0.25
    legacy: bool = True
    attn_type: str = "vanilla"

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions or ()))
        widths = [self.ch * m for m in self.ch_mult]
        if not widths or min(widths) < 1 or any(w % 32 for w in widths):
            raise ValueError(f"VQGANConfig: every ch * ch_mult must be a positive multiple of 32 (GroupNorm with 32 "
                             f"groups), got ch={self.ch}, ch_mult={self.ch_mult}")
        if self.double_z:
            raise ValueError("VQGANConfig: taming's VQModel needs double_z=False (double_z is for the KL autoencoder)")
        if self.attn_type not in ("vanilla", "none"):
            raise ValueError(f"VQGANConfig: attn_type must be 'vanilla' or 'none', got {self.attn_type!r}")
        if min(self.num_res_blocks, self.z_channels, self.embed_dim, self.n_embed, self.in_channels, self.out_ch) < 1:
            raise ValueError(f"VQGANConfig: sizes must be >= 1, got {self}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side: 2 ** (len(ch_mult) - 1) (16 for Chameleon)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_taming_params(cls, params: dict) -> "VQGANConfig":
        """From a taming yaml's `model.params` dict ({"ddconfig": {...}, "n_embed", "embed_dim", ...});
        keys VQGAN has no use for (lossconfig, ckpt_path, ...) are ignored."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in dict(params.get("ddconfig", {})).items() if k in names}
        values.update({k: params[k] for k in ("n_embed", "embed_dim") if k in params})
        return cls(**values)



# --- taming's building blocks (names are the state-dict keys) --------------------------------


class GroupNorm(nn.GroupNorm):
    """taming's Normalize: GroupNorm(32 groups, eps 1e-6, affine); fp16/bf16 inputs are normalised in fp32."""

    def __init__(self, channels: int):
        super().__init__(num_groups=32, num_channels=channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16):
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def swish(x: torch.Tensor) -> torch.Tensor:
    """taming's nonlinearity, x * sigmoid(x)."""
    return F.silu(x)


def conv3x3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus x (through the 1x1
    `nin_shortcut` when the width changes). taming's block without the timestep embedding."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm(in_channels), conv3x3(in_channels, out_channels)
        self.norm2, self.conv2 = GroupNorm(out_channels), conv3x3(out_channels, out_channels)
        self.dropout = nn.Dropout(dropout)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1-conv q, k, v, proj_out and a
    residual; softmax(q k^T / sqrt(C)) v, as taming's bmm formulation."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = GroupNorm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, kernel_size=1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(b, 1, c, height * width).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, height, width))


class Downsample(nn.Module):
    """Halves H and W: taming's asymmetric zero pad (0, 1, 0, 1) then a stride-2 3x3 conv (or 2x2 average pooling)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "conv"):
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour 2x, then a 3x3 conv (when with_conv)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


def make_attn(channels: int, attn_type: str) -> nn.Module:
    return AttnBlock(channels) if attn_type == "vanilla" else nn.Identity()


def make_level(widths, cfg: VQGANConfig, with_attn: bool) -> nn.Module:
    """One resolution level: `block` (ResnetBlocks over consecutive widths) and `attn` (one per block or none)."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(a, b, cfg.dropout) for a, b in zip(widths[:-1], widths[1:]))
    level.attn = nn.ModuleList(make_attn(w, cfg.attn_type) for w in widths[1:]) if with_attn else nn.ModuleList()
    return level


def make_middle(channels: int, cfg: VQGANConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg.dropout)
    mid.attn_1 = make_attn(channels, cfg.attn_type)
    mid.block_2 = ResnetBlock(channels, channels, cfg.dropout)
    return mid


def run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def run_middle(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H / f, W / f), f = cfg.downsample_factor."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = conv3x3(cfg.in_channels, cfg.ch)
        self.down = nn.ModuleList()
        res, width = cfg.resolution, cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            out = cfg.ch * mult
            level = make_level([width] + [out] * cfg.num_res_blocks, cfg, res in cfg.attn_resolutions)
            width = out
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(width, cfg.resamp_with_conv)
                res //= 2
            self.down.append(level)
        self.mid = make_middle(width, cfg)
        self.norm_out = GroupNorm(width)
        self.conv_out = conv3x3(width, cfg.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(swish(self.norm_out(run_middle(self.mid, h))))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h * f, w * f); `up` is indexed by level
    (up[0] is the full-resolution level), run from the last level to the first, as taming's."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        width = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = conv3x3(cfg.z_channels, width)
        self.mid = make_middle(width, cfg)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            out = cfg.ch * cfg.ch_mult[i]
            level = make_level([width] + [out] * (cfg.num_res_blocks + 1), cfg, res in cfg.attn_resolutions)
            width = out
            if i != 0:
                level.upsample = Upsample(width, cfg.resamp_with_conv)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = GroupNorm(width)
        self.conv_out = conv3x3(width, cfg.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = run_middle(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
