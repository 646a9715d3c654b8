"""APTP architecture codes for a diffusers UNet2DConditionModel: which groups one expert keeps.

Source: APTP (Ganjdanesh et al., ICLR 2025; rezashkv/diffusion_pruning, notes in
shared/reference/aptp.md sections 1.1-1.3). Four kinds of gates, keyed by diffusers module names:

  ResNet width  "down_blocks.0.resnets.0"                              (norm2.num_groups,) bool
                groups of conv1's output = conv2's input; the residual stream stays dense
  heads         "down_blocks.0.attentions.0.transformer_blocks.0.attn1" (heads,) bool (attn1 and attn2)
  GEGLU width   "down_blocks.0.attentions.0.transformer_blocks.0.ff"   (32,) bool, both GEGLU halves
  depth         "depth/down_blocks.0.resnets.1"                        True = the block runs
                the last ResNet and last Transformer2DModel of each down/up block; a skipped block
                is the identity, in up blocks on the non-skip part input[:, :C_in - skip_dim]

A missing width entry keeps every group; a missing depth entry runs the block. Groups are
contiguous channel blocks (APTP's repeat_interleave). `prune_unet` slices a UNet like APTP's
prune(); `to_masks` gives the per-layer channel masks mmfast's masked ops take.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .._modules import swap_submodule
from .._checkpoint_files import read_safetensors

__all__ = [
    "ArchitectureCode", "DepthSkip", "FF_GROUPS", "arch_vector_layout", "depth_gates", "width_gates",
    "random_architecture", "to_masks", "prune_unet",
]

FF_GROUPS = 32  # APTP's ff_gate_width
DEPTH_PREFIX = "depth/"

# (in_mask, out_mask) of one layer, None = all channels kept
LayerMask = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def _diffusers():
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    return ResnetBlock2D, Attention, FeedForward, GEGLU, Transformer2DModel


# --- the code -------------------------------------------------------------------------------


@dataclasses.dataclass
class ArchitectureCode:
    """One expert's structure. width: module name -> (groups,) bool kept groups; depth: block
    name -> True when the block runs (False: identity for this expert)."""

    width: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    depth: Dict[str, bool] = dataclasses.field(default_factory=dict)

    def to_tensors(self) -> Dict[str, torch.Tensor]:
        """Flat {name: bool tensor}: width names as they are, depth gates as "depth/<name>" (1,)."""
        out = {name: kept.bool().contiguous() for name, kept in self.width.items()}
        out.update({DEPTH_PREFIX + name: torch.tensor([bool(on)]) for name, on in self.depth.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor]) -> "ArchitectureCode":
        width = {k: v.bool() for k, v in tensors.items() if not k.startswith(DEPTH_PREFIX)}
        depth = {k[len(DEPTH_PREFIX):]: bool(v.reshape(-1)[0])
                 for k, v in tensors.items() if k.startswith(DEPTH_PREFIX)}
        return cls(width, depth)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file
        save_file(self.to_tensors(), path)

    @classmethod
    def load(cls, path: str) -> "ArchitectureCode":
        """The code save() wrote. Raises FileNotFoundError, ValueError for a file that is not
        readable safetensors."""
        return cls.from_tensors(read_safetensors(path, "ArchitectureCode"))

    def runs(self, block: str) -> bool:
        return self.depth.get(block, True)

    def kept(self, name: str, groups: int) -> torch.Tensor:
        kept = self.width.get(name)
        return torch.ones(groups, dtype=torch.bool) if kept is None else kept.bool().cpu()

    @classmethod
    def from_arch_vector(cls, arch_vector: torch.Tensor, unet: nn.Module,
                         ff_groups: int = FF_GROUPS) -> "ArchitectureCode":
        """The code of an official APTP `arch_vector.pt` (rezashkv/diffusion_pruning: one float
        tensor (1, D) or (D,), the expert's gate probabilities; load it with
        torch.load(path, weights_only=True)) for the dense `unet` it prunes. Entries are laid out
        as arch_vector_layout(unet) says; a gate keeps its group / runs its block where the value
        is >= 0.5 (APTP's hard_concrete). Raises ValueError when D does not match the UNet's gates
        or a value is not finite."""
        vector = torch.as_tensor(arch_vector).detach().float().cpu()
        if vector.dim() == 2 and vector.shape[0] == 1:
            vector = vector[0]
        widths, depths = arch_vector_layout(unet, ff_groups)
        expected = sum(groups for _, groups in widths) + len(depths)
        if vector.dim() != 1 or vector.numel() != expected:
            raise ValueError(f"ArchitectureCode.from_arch_vector: expected ({expected},) or (1, {expected}) for "
                             f"this UNet ({len(widths)} width gates, {expected - len(depths)} groups, {len(depths)} "
                             f"depth gates), got {tuple(torch.as_tensor(arch_vector).shape)}")
        if not bool(torch.isfinite(vector).all()):
            raise ValueError("ArchitectureCode.from_arch_vector: the vector holds NaN or infinite values")
        kept, width, start = vector >= 0.5, {}, 0
        for name, groups in widths:
            width[name] = kept[start:start + groups].clone()
            start += groups
        return cls(width, {name: bool(kept[start + i]) for i, name in enumerate(depths)})

    def to_arch_vector(self, unet: nn.Module, ff_groups: int = FF_GROUPS) -> torch.Tensor:
        """(1, D) float32 of 0 / 1 in the official layout (arch_vector_layout): what
        from_arch_vector reads back, and what APTP's UNet2DConditionModelPruned takes. Raises
        ValueError when a width entry's length is not its gate's group count."""
        widths, depths = arch_vector_layout(unet, ff_groups)
        parts = []
        for name, groups in widths:
            kept = self.kept(name, groups)
            if kept.numel() != groups:
                raise ValueError(f"ArchitectureCode.to_arch_vector: {name} keeps a ({kept.numel()},) vector, "
                                 f"the UNet's gate has {groups} groups")
            parts.append(kept.float())
        parts.append(torch.tensor([float(self.runs(name)) for name in depths]))
        return torch.cat(parts)[None]

    def summary(self) -> str:
        kept = sum(int(v.sum()) for v in self.width.values())
        total = sum(v.numel() for v in self.width.values())
        skipped = [n for n, on in self.depth.items() if not on]
        return f"width {kept}/{total} groups kept, {len(skipped)} of {len(self.depth)} depth-gated blocks skipped"


# --- which gates a UNet has -------------------------------------------------------------------


def width_gates(unet: nn.Module, ff_groups: int = FF_GROUPS) -> Dict[str, int]:
    """{module name: number of groups} of every width gate: ResnetBlock2D (norm2 groups),
    Attention (heads) and GEGLU FeedForward (ff_groups), in named_modules() order."""
    ResnetBlock2D, Attention, FeedForward, GEGLU, _ = _diffusers()
    gates = {}
    for name, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D):
            gates[name] = module.norm2.num_groups
        elif isinstance(module, Attention):
            gates[name] = module.heads
        elif isinstance(module, FeedForward) and isinstance(module.net[0], GEGLU):
            if module.net[2].in_features % ff_groups:
                raise ValueError(f"{name}: GEGLU width {module.net[2].in_features} is not divisible by {ff_groups}")
            gates[name] = ff_groups
    return gates


def depth_gates(unet: nn.Module) -> Dict[str, int]:
    """{block name: channels its identity keeps} of APTP's depth gates: the last resnet and the
    last attention (Transformer2DModel) of every down and up block ("HalfDepthGated"). The
    identity keeps input[:, :channels]: all of it in down blocks, the non-skip part of the
    concatenated input in up blocks. Blocks whose identity would change the shape (a single
    resnet per block, or one that changes the channel count) have no gate."""
    gates = {}
    for kind, blocks in (("down_blocks", unet.down_blocks), ("up_blocks", unet.up_blocks)):
        for i, block in enumerate(blocks):
            resnets = block.resnets
            last = resnets[-1]
            if kind == "up_blocks":
                ok = len(resnets) >= 2  # the non-skip input part is then the previous resnet's output
            else:
                ok = last.in_channels == last.out_channels
            if ok:
                gates[f"{kind}.{i}.resnets.{len(resnets) - 1}"] = last.out_channels
            attentions = getattr(block, "attentions", None)
            if attentions is not None and len(attentions) >= 1:
                gates[f"{kind}.{i}.attentions.{len(attentions) - 1}"] = attentions[-1].config.in_channels
    return gates


def arch_vector_layout(unet: nn.Module, ff_groups: int = FF_GROUPS) -> Tuple[list, list]:
    """([(width gate name, groups)], [depth gate names]): the order of an official APTP arch
    vector (rezashkv/diffusion_pruning, UNet2DConditionModelPruned.get_structure and
    HyperStructure.transform_arch_vector): every width gate first, block by block over
    down_blocks, mid_block, up_blocks, within a block its resnets (norm2 groups) and then its
    attentions, each transformer block as attn1 heads, attn2 heads, GEGLU groups; then every
    depth gate in the same block order (the last resnet, then the last attention, of each down
    and up block). For SD-2.1: 1606 width entries and 14 depth entries. Names are those of
    width_gates / depth_gates; gates this UNet lacks (no GEGLU) are left out."""
    gates, depth = width_gates(unet, ff_groups), depth_gates(unet)
    widths, depths = [], []
    blocks = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + \
        (["mid_block"] if getattr(unet, "mid_block", None) is not None else []) + \
        [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    for block_name in blocks:
        block = unet.get_submodule(block_name)
        resnets = [f"{block_name}.resnets.{i}" for i in range(len(block.resnets))]
        attentions = [f"{block_name}.attentions.{i}" for i in range(len(getattr(block, "attentions", None) or []))]
        for name in resnets:
            widths.append((name, gates[name]))
        for name in attentions:
            for j in range(len(unet.get_submodule(name).transformer_blocks)):
                for part in ("attn1", "attn2", "ff"):
                    gate = f"{name}.transformer_blocks.{j}.{part}"
                    if gate in gates:
                        widths.append((gate, gates[gate]))
        depths += [name for name in resnets + attentions if name in depth]
    missing = set(gates) - {name for name, _ in widths}
    if missing:
        raise NotImplementedError(f"arch_vector_layout: gates outside the official layout: {sorted(missing)}")
    return widths, depths


def random_architecture(unet: nn.Module, keep: Union[float, Tuple[float, float]] = (0.5, 1.0),
                        generator: Optional[torch.Generator] = None, skip_depth: float = 0.0,
                        ff_groups: int = FF_GROUPS) -> ArchitectureCode:
    """A random code for tests and examples: each width gate keeps a fraction drawn from
    keep = (low, high) (or exactly keep) of its groups, at least one (APTP's non_zero_width);
    each depth-gated block is skipped with probability skip_depth."""
    low, high = (keep, keep) if isinstance(keep, (int, float)) else keep
    width = {}
    for name, groups in width_gates(unet, ff_groups).items():
        fraction = low + (high - low) * float(torch.rand((), generator=generator))
        count = min(groups, max(1, round(fraction * groups)))
        kept = torch.zeros(groups, dtype=torch.bool)
        kept[torch.randperm(groups, generator=generator)[:count]] = True
        width[name] = kept
    depth = {name: bool(torch.rand((), generator=generator) >= skip_depth) for name in depth_gates(unet)}
    return ArchitectureCode(width, depth)


# --- masks and physical slicing ----------------------------------------------------------------


def _channels(kept_groups: torch.Tensor, channels: int) -> torch.Tensor:
    """(groups,) -> (channels,) bool: contiguous groups of channels // groups."""
    if channels % kept_groups.numel():
        raise ValueError(f"{channels} channels do not split into {kept_groups.numel()} groups")
    return kept_groups.bool().cpu().repeat_interleave(channels // kept_groups.numel())


def to_masks(unet: nn.Module, arch: ArchitectureCode, ff_groups: int = FF_GROUPS) -> Dict[str, LayerMask]:
    """{layer name: (in_mask, out_mask)} of the layers a code prunes (bool channel masks, None =
    all kept; norms have in = out). Layers not listed keep everything.

      resnet:    conv1 out, time_emb_proj out, norm2, conv2 in
      attention: to_q / to_k / to_v out and to_out.0 in, by head
      GEGLU FF:  net.0.proj out (both halves share the mask), net.2 in
    """
    gates = width_gates(unet, ff_groups)
    unknown = set(arch.width) - set(gates)
    if unknown:
        raise KeyError(f"to_masks: the code has width gates the UNet lacks: {sorted(unknown)[:4]}")
    unknown = set(arch.depth) - set(depth_gates(unet))
    if unknown:
        raise KeyError(f"to_masks: the code has depth gates the UNet lacks: {sorted(unknown)[:4]}")
    masks: Dict[str, LayerMask] = {}
    for name, kept_groups in arch.width.items():
        module = unet.get_submodule(name)
        if kept_groups.numel() != gates[name]:
            raise ValueError(f"to_masks: {name} has {gates[name]} groups, the code gives {kept_groups.numel()}")
        if not kept_groups.any():
            raise ValueError(f"to_masks: {name} prunes every group (APTP keeps at least one)")
        if hasattr(module, "conv1"):  # ResnetBlock2D
            m = _channels(kept_groups, module.conv1.out_channels)
            masks[f"{name}.conv1"] = (None, m)
            if module.time_emb_proj is not None:
                masks[f"{name}.time_emb_proj"] = (None, m)
            masks[f"{name}.norm2"] = (m, m)
            masks[f"{name}.conv2"] = (m, None)
        elif hasattr(module, "to_q"):  # Attention
            m = _channels(kept_groups, module.to_q.out_features)
            for proj in ("to_q", "to_k", "to_v"):
                masks[f"{name}.{proj}"] = (None, m)
            masks[f"{name}.to_out.0"] = (m, None)
        else:  # GEGLU FeedForward
            m = _channels(kept_groups, module.net[2].in_features)
            masks[f"{name}.net.0.proj"] = (None, torch.cat([m, m]))
            masks[f"{name}.net.2"] = (m, None)
    return masks


class DepthSkip(nn.Module):
    """A depth-gated block skipped by an expert: returns input[:, :channels] (the non-skip part of
    an up block's concatenated input; all of a down block's input). Called like the resnet it
    replaces (hidden_states, temb) or like the Transformer2DModel (returns a 1-tuple, as
    diffusers' blocks call it with return_dict=False)."""

    def __init__(self, channels: int, returns_tuple: bool):
        super().__init__()
        self.channels, self.returns_tuple = channels, returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states[:, :self.channels]
        return (out,) if self.returns_tuple else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, returns_tuple={self.returns_tuple}"


def _index(mask: Optional[torch.Tensor], size: int) -> torch.Tensor:
    return torch.arange(size) if mask is None else torch.nonzero(mask)[:, 0]


@torch.no_grad()
def _slice(module: nn.Module, in_mask: Optional[torch.Tensor], out_mask: Optional[torch.Tensor]) -> nn.Module:
    """A smaller copy of a Conv2d / Linear / GroupNorm keeping the masked-in channels."""
    if isinstance(module, nn.GroupNorm):
        size = module.num_channels // module.num_groups
        keep = _index(out_mask, module.num_channels)
        new = nn.GroupNorm(keep.numel() // size, keep.numel(), module.eps, module.affine, device="meta")
        if module.affine:
            new.weight = nn.Parameter(module.weight[keep].clone())
            new.bias = nn.Parameter(module.bias[keep].clone())
        return new
    out_size, in_size = module.weight.shape[:2]
    rows, cols = _index(out_mask, out_size), _index(in_mask, in_size)
    bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise NotImplementedError("prune_unet: grouped convolutions are not pruned")
        new = nn.Conv2d(cols.numel(), rows.numel(), module.kernel_size, module.stride, module.padding,
                        module.dilation, bias=bias, padding_mode=module.padding_mode, device="meta")
    else:
        new = nn.Linear(cols.numel(), rows.numel(), bias=bias, device="meta")
    new.weight = nn.Parameter(module.weight[rows][:, cols].clone())
    new.bias = nn.Parameter(module.bias[rows].clone()) if bias else None
    return new


def prune_unet(base_unet: nn.Module, arch: ArchitectureCode, ff_groups: int = FF_GROUPS) -> nn.Module:
    """A deep copy of base_unet physically sliced to `arch`, like APTP's prune(): resnets get a
    conv1 / time_emb_proj of kept rows, norm2 = GroupNorm(kept groups, kept channels) and a conv2
    of kept columns; attentions slice q/k/v rows and to_out.0 columns by head and set heads =
    kept; GEGLU FFs slice both proj halves and net.2's columns; skipped depth-gated blocks become
    DepthSkip. Works on the meta device (no weights needed, for loading checkpoints)."""
    masks = to_masks(base_unet, arch, ff_groups)
    unet = copy.deepcopy(base_unet)
    for name, (in_mask, out_mask) in masks.items():
        swap_submodule(unet, name, _slice(unet.get_submodule(name), in_mask, out_mask))
    _, Attention, _, _, _ = _diffusers()
    for name, kept in arch.width.items():
        attention = unet.get_submodule(name)
        if isinstance(attention, Attention):
            attention.heads = int(kept.sum())
            attention.inner_dim = attention.inner_kv_dim = attention.to_q.out_features
    for name, channels in depth_gates(base_unet).items():
        if not arch.runs(name):
            swap_submodule(unet, name, DepthSkip(channels, returns_tuple=".attentions." in name))
    return unet
