"""DiffDIS's UNet (arXiv 2410.10105) on stock diffusers: no forked diffusers needed.

DiffDIS fine-tunes the sd-turbo (SD-2.1) UNet into a one-step segmenter:
- input: cat([z_rgb, x_T], dim=1), 8 channels; mask and edge are the two halves of the batch
  (rows [mask_0..mask_{B-1}, edge_0..edge_{B-1}]);
- batch-discriminative embedding (BDE): a fixed 4-vector per half through
  `class_embedding` (TimestepEmbedding(4 -> C_t)), added to the time embedding;
- DBIA: one extra attention `attn3` (+ LayerNorm `norm2_`) in the mid-block transformer,
  after attn1: the mask half's queries attend to the edge half's keys/values and vice versa;
- SWCI: the image re-encoded at 1/2, 1/4, 1/8 scale gives, through rgb_conv (Conv3x3 + BN + GELU)
  and two zero-initialised 3x3 convs (rgb_proj -> gamma, rgb_proj1 -> beta), a FiLM of the
  skip connection that down block j (j < 3) hands to the decoder: skip * (1 + gamma) + beta.
State-dict keys and shapes are those of the released checkpoint (HF qianyu1217/diffdis, unet/).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .._checkpoint_files import read_json, read_safetensors

try:
    from diffusers import UNet2DConditionModel
except ImportError as error:  # diffusers is optional for mmfast, required for its DiffDIS model
    raise ImportError("mmfast.models.diffdis needs diffusers: pip install diffusers") from error

# Released checkpoint: 8 input channels; BDE through a "projection" class embedding of a 4-vector.
DIFFDIS_OVERRIDES = {"in_channels": 8, "class_embed_type": "projection", "projection_class_embeddings_input_dim": 4}
SWCI_LEVELS = 3  # down blocks 0..2 get their skip modulated, from latents at 1/2, 1/4, 1/8 scale
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Config options of UNet2DConditionModel the DiffDIS forward does not implement.
_UNSUPPORTED = {"addition_embed_type": None, "encoder_hid_dim_type": None, "time_cond_proj_dim": None,
                "class_embeddings_concat": False, "center_input_sample": False, "time_embedding_act_fn": None,
                "mid_block_type": "UNetMidBlock2DCrossAttn"}


def batch_discriminative_embedding(batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """DiffDIS's BDE labels, (2 * batch_size, 4): batch_size mask rows, then batch_size edge rows.

    mask = [sin 0, sin 1, cos 0, cos 1], edge = [sin 1, sin 0, cos 1, cos 0] (DiffDIS pipeline).
    """
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    rows = torch.cat([labels.sin(), labels.cos()], dim=-1)
    return rows.repeat_interleave(batch_size, dim=0).to(device=device, dtype=dtype)


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[first half; second half] -> [second half; first half] along dim 0."""
    if x.shape[0] % 2:
        raise ValueError(f"DiffDIS: the batch holds mask and edge halves and must be even, got {x.shape[0]} rows")
    first, second = x.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class DBIATransformerBlock(nn.Module):
    """BasicTransformerBlock (layer_norm type) with DiffDIS's DBIA attention between attn1 and attn2.

    Holds the original block's modules under their own names (so the state-dict keys are
    unchanged) plus norm2_ and attn3. attn3 is a standard diffusers Attention called with the
    other half's tokens as encoder_hidden_states: that is DiffDIS's K/V half-swap, and it stays
    correct whatever attention processor a user sets on the UNet.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        if (block.norm_type != "layer_norm" or block.only_cross_attention or block.pos_embed is not None
                or block.attn2 is None):
            raise ValueError("DiffDIS: the mid-block transformer must be an SD-2.1-style BasicTransformerBlock "
                             "(layer_norm, self-attention, cross-attention, no positional embedding)")
        for name in ("norm1", "attn1", "norm2", "attn2", "norm3", "ff"):
            self.add_module(name, getattr(block, name))
        self._chunk_size, self._chunk_dim = block._chunk_size, block._chunk_dim
        attn1 = block.attn1
        dim = attn1.to_q.in_features
        self.norm2_ = nn.LayerNorm(dim, eps=block.norm2.eps, elementwise_affine=block.norm2.elementwise_affine)
        # a cross-attention (to the other branch's states) of self-attention's shapes: declared as
        # one (cross_attention_dim=dim: the same weights) so fuse_qkv_projections fuses its k / v
        # only, as its call needs (a fused to_qkv left it without to_kv)
        self.attn3 = Attention(query_dim=dim, cross_attention_dim=dim, heads=attn1.heads,
                               dim_head=attn1.to_q.out_features // attn1.heads, bias=attn1.to_q.bias is not None,
                               upcast_attention=attn1.upcast_attention, out_bias=attn1.to_out[0].bias is not None)

    def set_chunk_feed_forward(self, chunk_size: Optional[int], dim: int = 0) -> None:
        """diffusers' feed-forward chunking (UNet2DConditionModel.enable_forward_chunking)."""
        self._chunk_size, self._chunk_dim = chunk_size, dim

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._chunk_size is None:
            return self.ff(x)
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(self.ff, x, self._chunk_dim, self._chunk_size)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        kwargs = cross_attention_kwargs or {}
        h = hidden_states
        h = self.attn1(self.norm1(h), attention_mask=attention_mask, **kwargs) + h
        normed = self.norm2_(h)
        h = self.attn3(normed, encoder_hidden_states=swap_halves(normed), **kwargs) + h
        h = self.attn2(self.norm2(h), encoder_hidden_states=encoder_hidden_states,
                       attention_mask=encoder_attention_mask, **kwargs) + h
        return self._feed_forward(self.norm3(h)) + h


def _conv_bn_gelu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.GELU())


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _load_config(config) -> dict:
    if isinstance(config, (str, os.PathLike)):
        path = os.path.join(config, "config.json") if os.path.isdir(config) else config
        return read_json(path, "DiffDISUNet")
    return dict(config)


def _check_config(config: dict) -> None:
    for key, supported in _UNSUPPORTED.items():
        if config.get(key, supported) != supported:
            raise ValueError(f"DiffDISUNet: config {key}={config[key]!r} is not supported (DiffDIS builds on an "
                             f"SD-2.1 UNet config, where it is {supported!r})")
    down = list(config.get("down_block_types", ()))
    if len(down) <= SWCI_LEVELS or any("CrossAttn" not in name for name in down[:SWCI_LEVELS]):
        raise ValueError(f"DiffDISUNet: SWCI needs >= {SWCI_LEVELS + 1} down blocks, the first {SWCI_LEVELS} with "
                         f"cross-attention (SD-2.1: 3 x CrossAttnDownBlock2D + DownBlock2D), got {down}")


class DiffDISUNet(UNet2DConditionModel):
    """UNet2DConditionModel + DiffDIS's BDE, DBIA (attn3) and SWCI (rgb_conv/rgb_proj/rgb_proj1).

    Build with `DiffDISUNet.from_config(sd21_unet_config)` (a stock SD-2.1 / sd-turbo
    unet/config.json, dict or path) or load with `DiffDISUNet.from_pretrained(unet_dir)`.
    Call with `forward(sample, timestep, encoder_hidden_states, class_labels=None,
    rgb_latents=..., mask_only=False)`. BatchNorm in SWCI means inference runs in eval().
    """

    @classmethod
    def from_config(cls, config, **overrides) -> "DiffDISUNet":
        """config: a stock SD-2.1 UNet config (dict, or path to config.json or its directory).

        The DiffDIS options (in_channels=8, class_embed_type="projection", input dim 4) are
        applied on top; `overrides` replace further config entries. Raises ValueError for
        configs DiffDIS cannot be built on (see _UNSUPPORTED, fewer than 4 down blocks).
        """
        config = {**_load_config(config), **DIFFDIS_OVERRIDES, **overrides}
        _check_config(config)
        keys = cls._get_init_keys(UNet2DConditionModel)
        model = cls(**{key: value for key, value in config.items() if key in keys})
        model._add_diffdis_modules()
        return model

    @classmethod
    def from_pretrained(cls, directory: str, torch_dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device] = "cpu") -> "DiffDISUNet":
        """Loads a local DiffDIS unet directory: config.json + diffusion_pytorch_model.safetensors.

        config.json may be the stock sd-turbo config (the official instructions copy it next to
        the weights) or carry the DiffDIS options. Loads with strict=True through safetensors;
        nothing is downloaded. Raises FileNotFoundError naming the missing file, ValueError for a
        config.json that is not JSON or weights that are not readable safetensors (e.g. truncated),
        and RuntimeError listing missing/unexpected keys.
        """
        weights = os.path.join(directory, WEIGHTS_NAME)
        for path in (os.path.join(directory, "config.json"), weights):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"DiffDISUNet: {path} is missing; a DiffDIS unet directory holds config.json "
                                        f"and {WEIGHTS_NAME} (mmfast never downloads: fetch qianyu1217/diffdis first)")
        with torch.device("meta"):
            model = cls.from_config(directory)
        state = read_safetensors(weights, "DiffDISUNet", device=device, dtype=torch_dtype)
        added = [name for name in model.state_dict() if any(part in name for part in ("attn3", "rgb_conv", "rgb_proj"))]
        expected = set(model.state_dict())
        prefixes = {key.split(".", 1)[0] + "." for key in state if "." in key and key.split(".", 1)[1] in expected}
        if len(prefixes) == 1 and not expected & set(state):  # e.g. "unet.conv_in.weight": a wrapper's state dict
            raise ValueError(f"DiffDISUNet.from_pretrained: {weights} holds the UNet's weights under the prefix "
                             f"{prefixes.pop()!r} (a wrapper's state dict); strip it and save the UNet's own keys")
        if added and not any(name in state for name in added):
            raise ValueError(f"DiffDISUNet.from_pretrained: {weights} holds none of DiffDIS's added weights (attn3, "
                             "rgb_conv, rgb_proj: e.g. a stock sd-turbo / SD-2.1 UNet); point at the unet/ folder "
                             "of a DiffDIS checkpoint (qianyu1217/diffdis)")
        model.load_state_dict(state, strict=True, assign=True)
        left = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
        if left:
            raise RuntimeError(f"DiffDISUNet.from_pretrained: {weights} did not provide {left[:5]}")
        return model.eval()

    def _add_diffdis_modules(self) -> None:
        channels = list(self.config.block_out_channels[:SWCI_LEVELS])
        self.rgb_conv = nn.ModuleList([_conv_bn_gelu(self.config.out_channels, c) for c in channels])
        self.rgb_proj = nn.ModuleList([_zero_conv(c) for c in channels])
        self.rgb_proj1 = nn.ModuleList([_zero_conv(c) for c in channels])
        transformer = self.mid_block.attentions[0]
        if len(transformer.transformer_blocks) != 1:
            raise ValueError("DiffDISUNet: the mid-block transformer must have one block (SD-2.1)")
        transformer.transformer_blocks[0] = DBIATransformerBlock(transformer.transformer_blocks[0])

    @torch.no_grad()
    def init_from_sd_unet(self, sd_unet: nn.Module) -> None:
        """DiffDIS's training initialisation from a 4-channel SD-2.1 UNet (run_train.py):
        conv_in weight repeated over the 8 inputs and halved, attn1 -> attn3 and norm1 -> norm2_
        copied in the mid block, everything else loaded as is; the new modules keep their init.
        """
        state = dict(sd_unet.state_dict())
        state["conv_in.weight"] = state["conv_in.weight"].repeat(1, 2, 1, 1) * 0.5
        block = "mid_block.attentions.0.transformer_blocks.0."
        for key in [k for k in state if k.startswith(block + "attn1.")]:
            state[key.replace(".attn1.", ".attn3.")] = state[key]
        for key in [k for k in state if k.startswith(block + "norm1.")]:
            state[key.replace(".norm1.", ".norm2_.")] = state[key]
        missing, unexpected = self.load_state_dict(state, strict=False)
        new_modules = ("class_embedding.", "rgb_conv.", "rgb_proj.", "rgb_proj1.")
        if unexpected or any(not key.startswith(new_modules) for key in missing):
            raise RuntimeError(f"DiffDISUNet.init_from_sd_unet: the SD UNet does not match: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")

    # --- forward ---------------------------------------------------------------------------

    def _check_inputs(self, sample, rgb_latents) -> int:
        if sample.dim() != 4 or sample.shape[1] != self.config.in_channels or sample.shape[0] % 2:
            raise ValueError(f"DiffDISUNet: sample must be (2B, {self.config.in_channels}, h, w) = "
                             f"cat([z_rgb, x_t], 1) with mask rows then edge rows, got {tuple(sample.shape)}")
        factor = 2 ** (len(self.down_blocks) - 1)
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(f"DiffDISUNet: latent height and width must be multiples of {factor} "
                             f"(image multiples of {8 * factor}), got {tuple(sample.shape[2:])}")
        if rgb_latents is None or len(rgb_latents) != SWCI_LEVELS:
            raise ValueError(f"DiffDISUNet: rgb_latents must be the {SWCI_LEVELS} VAE latents of the image at "
                             "1/2, 1/4 and 1/8 scale (SWCI)")
        half = sample.shape[0] // 2
        for level, latent in enumerate(rgb_latents, start=1):
            want = (sample.shape[2] >> level, sample.shape[3] >> level)
            if latent.dim() != 4 or latent.shape[0] not in (half, 2 * half) or tuple(latent.shape[2:]) != want:
                raise ValueError(f"DiffDISUNet: rgb_latents[{level - 1}] must be ({half} or {2 * half}, "
                                 f"{self.config.out_channels}, {want[0]}, {want[1]}), got {tuple(latent.shape)}")
        return half

    def _swci(self, level: int, skip: torch.Tensor, rgb_latent: torch.Tensor) -> torch.Tensor:
        """skip * (1 + gamma) + beta, gamma/beta computed once per image and shared by both halves."""
        features = self.rgb_conv[level](rgb_latent.to(skip.dtype))
        gamma, beta = self.rgb_proj[level](features), self.rgb_proj1[level](features)
        if gamma.shape[0] != skip.shape[0]:
            gamma, beta = gamma.repeat(2, 1, 1, 1), beta.repeat(2, 1, 1, 1)
        return skip * gamma + beta + skip

    def _embedding(self, sample, timestep, class_labels, half):
        emb = self.time_embedding(self.get_time_embed(sample=sample, timestep=timestep))
        if class_labels is None:
            class_labels = batch_discriminative_embedding(half, sample.device, sample.dtype)
        return emb + self.get_class_embed(sample=sample, class_labels=class_labels)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None, rgb_latents: Optional[Sequence[torch.Tensor]] = None,
                *, mask_only: bool = False, cross_attention_kwargs: Optional[dict] = None, return_dict: bool = True):
        """One DiffDIS UNet evaluation.

        sample: (2B, 8, h, w) = cat([z_rgb, x_t], 1), B mask rows then B edge rows; h, w multiples of 8.
        timestep: int or (2B,) tensor (DiffDIS: 999). encoder_hidden_states: (2B, L, cross_attention_dim).
        class_labels: (2B, 4) BDE; None gives batch_discriminative_embedding(B).
        rgb_latents: 3 latents (B or 2B, 4, h/2^k, w/2^k), k = 1, 2, 3 (SWCI; the official
          rgb_token list without its unused first entry).
        mask_only: run the up path on the mask half only; the mask rows are identical to the
          full call's (the edge half is still needed through the mid block, for DBIA).
        Returns UNet2DConditionOutput(sample=(2B or B, 4, h, w)) (a tuple if not return_dict).
        """
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        half = self._check_inputs(sample, rgb_latents)
        emb = self._embedding(sample, timestep, class_labels, half)
        context = dict(encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs)

        hidden = self.conv_in(sample)
        skips = [hidden]
        for level, block in enumerate(self.down_blocks):
            if getattr(block, "has_cross_attention", False):
                hidden, block_skips = block(hidden, emb, **context)
            else:
                hidden, block_skips = block(hidden, emb)
            skips.extend(block_skips)
            if level < SWCI_LEVELS:  # only the skip to the decoder, not `hidden`
                skips[-1] = self._swci(level, skips[-1], rgb_latents[level])
        hidden = self.mid_block(hidden, emb, **context)

        if mask_only:
            hidden, emb, skips = hidden[:half], emb[:half], [skip[:half] for skip in skips]
            context["encoder_hidden_states"] = encoder_hidden_states[:half]
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips, skips = tuple(skips[-count:]), skips[:-count]
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden, block_skips, emb, **context)
            else:
                hidden = block(hidden, block_skips, emb)
        out = self.conv_out(self.conv_act(self.conv_norm_out(hidden)))
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)
