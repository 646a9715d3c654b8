"""APTP expert checkpoints on local disk: nothing is downloaded, nothing is unpickled.

Two layouts load into the (sliced expert UNet, ArchitectureCode) pairs AptpUNet.from_experts takes:

  mmfast's   <dir>/config.json (the DENSE base config), diffusion_pytorch_model.safetensors (the
             sliced weights) and architecture.safetensors (the ArchitectureCode), written by
             save_expert.
  released   the fine-tuned experts of rezashkv/diffusion_pruning (HF APTP-Base-CC3M/arch0..arch15,
             APTP-Small-CC3M/arch0..arch7, ...): arch_vector.pt, a (1, D) float tensor of gate
             probabilities, and unet/diffusion_pytorch_model.safetensors, the state dict of APTP's
             UNet2DConditionModelPruned after prune(): diffusers' key names with sliced shapes and
             no keys in the blocks its depth gates drop. This is what the official
             scripts/metrics/generate_fid_images.py reads (arch_vector.pt beside unet/, or the
             trainer's copy inside checkpoint-<step>/unet/).

diffusers' from_pretrained cannot load sliced weights into the dense config (shape mismatch), so
the dense skeleton is built on the meta device, sliced with prune_unet and the weights assigned.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .architecture import FF_GROUPS, ArchitectureCode, prune_unet

__all__ = [
    "ARCH_FILE", "RELEASED_ARCH_FILE", "WEIGHTS_FILE", "dense_skeleton", "load_expert", "load_released_expert",
    "released_expert_dirs", "save_expert",
]

ARCH_FILE = "architecture.safetensors"  # mmfast's ArchitectureCode
RELEASED_ARCH_FILE = "arch_vector.pt"  # the official gate probabilities
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
# APTP's gated block classes are diffusers' blocks with a suffix: CrossAttnDownBlock2DHalfGated,
# UNetMidBlock2DCrossAttnWidthGated, ...WidthDepthGated, ...WidthHalfDepthGated
_GATED_SUFFIX = re.compile(r"(?:Width|Half|Depth)*Gated$")


def save_expert(directory: str, expert: nn.Module, arch: ArchitectureCode, base_unet: nn.Module) -> None:
    """Writes a physically sliced expert as <directory>/config.json (the dense base config),
    diffusion_pytorch_model.safetensors (the sliced weights) and architecture.safetensors."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    base_unet.save_config(directory)
    save_file({k: v.contiguous() for k, v in expert.state_dict().items()}, os.path.join(directory, WEIGHTS_FILE))
    arch.save(os.path.join(directory, ARCH_FILE))


def load_expert(directory: str, arch_file: str = ARCH_FILE, ff_groups: int = FF_GROUPS, *,
                base_config: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """(expert UNet in eval mode, ArchitectureCode) from a local directory in either layout of
    this module's docstring: mmfast's when <directory>/<arch_file> exists, else a released APTP
    expert (load_released_expert; base_config and dtype are passed on). dtype casts the weights
    as they load (None: as stored). Raises FileNotFoundError when the directory holds neither."""
    if os.path.isfile(os.path.join(directory, arch_file)):
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file
        arch = ArchitectureCode.load(os.path.join(directory, arch_file))
        config = UNet2DConditionModel.load_config(directory, local_files_only=True)
        with torch.device("meta"):
            skeleton = prune_unet(UNet2DConditionModel.from_config(config), arch, ff_groups)
        weights = os.path.join(directory, WEIGHTS_FILE)
        return _assign(skeleton, _cast(load_file(weights), dtype), weights, arch), arch
    if not _find(directory, RELEASED_ARCH_FILE):
        raise FileNotFoundError(f"load_expert: {directory} holds neither an mmfast expert ({arch_file}, written by "
                                f"save_expert) nor a released APTP expert ({RELEASED_ARCH_FILE} and "
                                f"unet/{WEIGHTS_FILE})")
    return load_released_expert(directory, base_config=base_config, dtype=dtype)


def load_released_expert(directory: str, base_config: Optional[str] = None,
                         dtype: Optional[torch.dtype] = None) -> Tuple[nn.Module, ArchitectureCode]:
    """(expert UNet in eval mode, ArchitectureCode) of one released APTP expert.

    directory: an expert folder (e.g. APTP-Base-CC3M/arch11) or one checkpoint inside it; it must
    hold exactly one diffusion_pytorch_model.safetensors (at any depth), and arch_vector.pt beside
    it or in a folder above it (up to `directory`). arch_vector.pt is read with
    torch.load(weights_only=True); values >= 0.5 keep a group / run a block (APTP's hard_concrete).
    base_config: the dense SD-2.1 UNet the experts were pruned from (a folder with config.json,
    or a pipeline folder with unet/config.json); default: the config.json saved beside the weights,
    its APTP block classes mapped back to diffusers' (CrossAttnDownBlock2DHalfGated ->
    CrossAttnDownBlock2D). ff_gate_width / gated_ff come from that saved config when present.
    dtype: cast the weights as they load (None: as stored).

    Raises FileNotFoundError (no weights, no arch vector, no config), ValueError (several
    checkpoints under directory, an arch vector that does not fit the config, weights whose keys or
    shapes are not the expert the arch vector describes) and NotImplementedError (experts trained
    with ungated feed-forwards, gated_ff = false)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    weights, arch_path = _released_files(directory)
    config, ff_groups = _released_config(os.path.dirname(weights), base_config)
    vector = torch.load(arch_path, map_location="cpu", weights_only=True)
    if not isinstance(vector, torch.Tensor):
        raise ValueError(f"load_released_expert: {arch_path} holds a {type(vector).__name__}, expected the (1, D) "
                         "tensor of gate probabilities APTP saves")
    with torch.device("meta"):
        dense = UNet2DConditionModel.from_config(config)
    arch = ArchitectureCode.from_arch_vector(vector, dense, ff_groups)
    expert = prune_unet(dense, arch, ff_groups)
    return _assign(expert, _cast(load_file(weights), dtype), weights, arch), arch


def released_expert_dirs(root: str) -> List[str]:
    """The arch<k> folders of a released APTP model folder (e.g. APTP-Base-CC3M) in expert order
    (arch0, arch1, ..., arch10: by k, not by name), so that code k of AptpUNet.from_experts is
    expert k when all are present. Raises FileNotFoundError when there is none."""
    found = {}
    for name in os.listdir(root):
        match = re.fullmatch(r"arch(\d+)", name)
        if match and os.path.isdir(os.path.join(root, name)):
            found[int(match.group(1))] = os.path.join(root, name)
    if not found:
        raise FileNotFoundError(f"released_expert_dirs: no arch<k> folders in {root}")
    return [found[k] for k in sorted(found)]


def dense_skeleton(directory: str, base_config: Optional[str] = None) -> nn.Module:
    """The dense UNet2DConditionModel of an expert directory on the meta device (structure only):
    the config of an mmfast expert directory, or of a released one (see load_released_expert)."""
    from diffusers import UNet2DConditionModel
    if os.path.isfile(os.path.join(directory, CONFIG_FILE)) and not _find(directory, RELEASED_ARCH_FILE):
        config = UNet2DConditionModel.load_config(directory, local_files_only=True)
    else:
        weights, _ = _released_files(directory)
        config, _ = _released_config(os.path.dirname(weights), base_config)
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config).eval()


# --- helpers ----------------------------------------------------------------------------------------


def _find(directory: str, filename: str) -> List[str]:
    """Every <filename> under directory (itself included), sorted."""
    return sorted(glob.glob(os.path.join(glob.escape(directory), "**", filename), recursive=True))


def _released_files(directory: str) -> Tuple[str, str]:
    """(weights file, arch_vector.pt) of the one checkpoint under directory."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_released_expert: {directory} is not a directory")
    weights = _find(directory, WEIGHTS_FILE)
    if not weights:
        raise FileNotFoundError(f"load_released_expert: no {WEIGHTS_FILE} under {directory} (released experts keep "
                                f"their weights in unet/{WEIGHTS_FILE}; .bin weights are not read)")
    if len(weights) > 1:
        listed = ", ".join(os.path.relpath(os.path.dirname(w), directory) for w in weights)
        raise ValueError(f"load_released_expert: {len(weights)} checkpoints under {directory} ({listed}): pass the "
                         "folder of one of them")
    # the trainer copies arch_vector.pt into checkpoint-<step>/unet/; the FID script reads it from
    # the folder above unet/: look beside the weights first, then upwards to `directory`
    parts = os.path.relpath(os.path.dirname(weights[0]), directory).split(os.sep)
    for depth in range(len(parts), -1, -1):
        candidate = os.path.join(directory, *parts[:depth], RELEASED_ARCH_FILE)
        if os.path.isfile(candidate):
            return weights[0], candidate
    raise FileNotFoundError(f"load_released_expert: no {RELEASED_ARCH_FILE} beside {weights[0]} or in a folder above "
                            f"it (up to {directory})")


def _dense_block_type(name: str) -> str:
    from diffusers.models.unets import unet_2d_blocks
    dense = _GATED_SUFFIX.sub("", name)
    if not hasattr(unet_2d_blocks, dense):
        raise ValueError(f"load_released_expert: block type {name!r} is neither a diffusers block nor one of APTP's "
                         "gated ones; pass base_config=<the dense UNet folder>")
    return dense


def _released_config(weights_dir: str, base_config: Optional[str]) -> Tuple[Dict, int]:
    """(dense UNet2DConditionModel config, GEGLU groups) of a released expert."""
    from diffusers import UNet2DConditionModel
    saved = os.path.join(weights_dir, CONFIG_FILE)
    saved_config = UNet2DConditionModel.load_config(weights_dir, local_files_only=True) \
        if os.path.isfile(saved) else {}
    if saved_config.get("gated_ff", True) is False:
        raise NotImplementedError(f"load_released_expert: {saved} says gated_ff = false (ungated feed-forwards); "
                                  "only experts with GEGLU width gates (APTP's released configs) are supported")
    ff_groups = int(saved_config.get("ff_gate_width", FF_GROUPS))
    if base_config is not None:
        source = base_config if os.path.isfile(os.path.join(base_config, CONFIG_FILE)) \
            else os.path.join(base_config, "unet")
        if not os.path.isfile(os.path.join(source, CONFIG_FILE)):
            raise FileNotFoundError(f"load_released_expert: base_config {base_config} has neither {CONFIG_FILE} nor "
                                    f"unet/{CONFIG_FILE}")
        config = dict(UNet2DConditionModel.load_config(source, local_files_only=True))
    elif saved_config:
        config = dict(saved_config)
    else:
        raise FileNotFoundError(f"load_released_expert: no {CONFIG_FILE} beside {weights_dir}: pass base_config=<the "
                                "dense UNet folder the experts were pruned from, e.g. stable-diffusion-2-1/unet>")
    for key in ("gated_ff", "ff_gate_width"):
        config.pop(key, None)
    config["down_block_types"] = [_dense_block_type(t) for t in config["down_block_types"]]
    config["up_block_types"] = [_dense_block_type(t) for t in config["up_block_types"]]
    if config.get("mid_block_type"):
        config["mid_block_type"] = _dense_block_type(config["mid_block_type"])
    config["_class_name"] = "UNet2DConditionModel"
    return config, ff_groups


def _cast(state_dict: Dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    return state_dict if dtype is None else {k: v.to(dtype) for k, v in state_dict.items()}


def _assign(skeleton: nn.Module, state_dict: Dict[str, torch.Tensor], source: str, arch: ArchitectureCode):
    """Assigns the weights to the sliced meta skeleton, after checking every key and shape."""
    expected = skeleton.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or reshaped:
        def some(names):
            return f"{len(names)}" + (f" (e.g. {', '.join(names[:2])})" if names else "")
        raise ValueError(f"{source} does not hold the expert its architecture code describes ({arch.summary()}): "
                         f"{some(missing)} tensors missing, {some(unexpected)} unexpected, {some(reshaped)} of other "
                         "shapes (file vs code). Is the config the dense UNet these experts were pruned from?")
    skeleton.load_state_dict(state_dict, strict=True, assign=True)
    return skeleton.eval()
