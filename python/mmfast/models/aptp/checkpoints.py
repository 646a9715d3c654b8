"""APTP expert checkpoints on local disk: nothing is downloaded, nothing is unpickled.

Two layouts load into the (sliced expert UNet, ArchitectureCode) pairs AptpUNet.from_experts takes:

  mmfast's   <dir>/config.json (the DENSE base config), diffusion_pytorch_model.safetensors (the
             sliced weights) and architecture.safetensors (the ArchitectureCode), written by
             save_expert.
  released   the fine-tuned experts of APTP (code: GitHub rezashkv/diffusion_pruning; weights: Hugging
             Face rezashkv/APTP, APTP-Base-CC3M/arch0..arch15, APTP-Small-CC3M/arch0..arch7, ...):
             arch_vector.pt, a (1, D) float tensor of gate probabilities, and
             unet/diffusion_pytorch_model.safetensors, the state dict of APTP's
             UNet2DConditionModelPruned after prune(): diffusers' key names with sliced shapes and
             no keys in the blocks its depth gates drop. This is what the official
             scripts/metrics/generate_fid_images.py reads (arch_vector.pt in the folder above
             unet/; the trainer also leaves copies in checkpoint-<step>/, older versions in unet/).

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

from ...ops._checks import check_dtype_argument, is_integer
from .._checkpoint_files import read_safetensors
from .architecture import FF_GROUPS, ArchitectureCode, prune_unet

__all__ = [
    "ARCH_FILE", "RELEASED_ARCH_FILE", "WEIGHTS_FILE", "dense_skeleton", "load_expert", "load_released_expert",
    "released_expert_dirs", "save_expert",
]

ARCH_FILE = "architecture.safetensors"  # mmfast's ArchitectureCode
RELEASED_ARCH_FILE = "arch_vector.pt"  # the official gate probabilities
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
# APTP's gated block classes whose depth gates sit where depth_gates() puts them (the last resnet
# and attention of each down / up block): diffusers' block name + this suffix. Its "...Gated" and
# "...WidthDepthGated" blocks gate every layer's depth: not supported.
_HALF_GATED = re.compile(r"^(?P<block>\w+?)(?:WidthHalfDepthGated|HalfGated)$")
_MID_GATED = {"UNetMidBlock2DCrossAttnWidthGated": "UNetMidBlock2DCrossAttn"}


def save_expert(directory: str, expert: nn.Module, arch: ArchitectureCode, base_unet: nn.Module) -> None:
    """Writes a physically sliced expert as <directory>/config.json (the dense base config),
    diffusion_pytorch_model.safetensors (the sliced weights) and architecture.safetensors."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    base_unet.save_config(directory)
    save_file({k: v.contiguous() for k, v in expert.state_dict().items()}, os.path.join(directory, WEIGHTS_FILE))
    arch.save(os.path.join(directory, ARCH_FILE))


def load_expert(directory: str, arch_file: str = ARCH_FILE, ff_groups: Optional[int] = None, *,
                base_config: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """(expert UNet in eval mode, ArchitectureCode) from a local directory in either layout of
    this module's docstring: mmfast's when <directory>/<arch_file> exists, else a released APTP
    expert (load_released_expert; ff_groups, base_config and dtype are passed on). ff_groups:
    GEGLU groups per feed-forward (None: APTP's 32, or a released expert's saved ff_gate_width).
    dtype casts the weights as they load (None: as stored). Raises FileNotFoundError when the
    directory does not exist or holds neither layout."""
    _check_dtype(dtype)
    if ff_groups is not None and (not is_integer(ff_groups) or ff_groups < 1):
        raise ValueError(f"load_expert: ff_groups must be a positive int or None, got {ff_groups!r}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_expert: {directory} does not exist or is not a directory")
    if os.path.isfile(os.path.join(directory, arch_file)):
        from diffusers import UNet2DConditionModel
        arch = ArchitectureCode.load(os.path.join(directory, arch_file))
        if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
            raise FileNotFoundError(f"load_expert: {directory} has {arch_file} but no {CONFIG_FILE} (save_expert writes "
                                    "both, with the weights): an incomplete copy?")
        config = UNet2DConditionModel.load_config(directory, local_files_only=True)
        with torch.device("meta"):
            skeleton = prune_unet(UNet2DConditionModel.from_config(config), arch, ff_groups or FF_GROUPS)
        weights = os.path.join(directory, WEIGHTS_FILE)
        return _assign(skeleton, _load_weights(weights, dtype), weights, arch), arch
    above = os.path.dirname(os.path.abspath(directory))  # a released expert's unet/ folder: arch_vector.pt is above
    if not _find(directory, RELEASED_ARCH_FILE) and not os.path.isfile(os.path.join(above, RELEASED_ARCH_FILE)):
        raise FileNotFoundError(f"load_expert: {directory} holds neither an mmfast expert ({arch_file}, written by "
                                f"save_expert) nor a released APTP expert ({RELEASED_ARCH_FILE} and "
                                f"unet/{WEIGHTS_FILE})")
    return load_released_expert(directory, base_config=base_config, dtype=dtype, ff_groups=ff_groups)


def load_released_expert(directory: str, base_config: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                         ff_groups: Optional[int] = None) -> Tuple[nn.Module, ArchitectureCode]:
    """(expert UNet in eval mode, ArchitectureCode) of one released APTP expert.

    directory: an expert folder (e.g. APTP-Base-CC3M/arch11), one checkpoint inside it, or its
    unet/ folder; it must hold exactly one unet/diffusion_pytorch_model.safetensors (at any depth;
    hypernet/ and quantizer/ weights are not read), and arch_vector.pt beside it, in the folder
    above unet/ or further up to `directory`. arch_vector.pt is read with
    torch.load(weights_only=True); values >= 0.5 keep a group / run a block (APTP's hard_concrete).
    base_config: the dense SD-2.1 UNet the experts were pruned from (a folder with config.json,
    or a pipeline folder with unet/config.json); default: the config.json saved beside the weights,
    its APTP block classes mapped back to diffusers' (CrossAttnDownBlock2DHalfGated ->
    CrossAttnDownBlock2D). ff_groups: GEGLU groups per feed-forward (None: the saved config's
    ff_gate_width, else APTP's 32). dtype: cast the weights as they load (None: as stored).

    Raises FileNotFoundError (no weights, no arch vector, no config), ValueError (several
    checkpoints under directory, an unreadable file, an arch vector that does not fit the config,
    weights whose keys or shapes are not the expert the arch vector describes), TypeError (dtype
    not a torch.dtype) and NotImplementedError (experts with ungated feed-forwards, per-block
    ff_gate_width, or APTP blocks that depth-gate every layer)."""
    from diffusers import UNet2DConditionModel
    _check_dtype(dtype)
    weights, arch_path = _released_files(directory)
    config, saved_ff_groups = _released_config(os.path.dirname(weights), base_config)
    ff_groups = ff_groups or saved_ff_groups
    vector = _load_arch_vector(arch_path)
    with torch.device("meta"):
        dense = UNet2DConditionModel.from_config(config)
    arch = ArchitectureCode.from_arch_vector(vector, dense, ff_groups)
    expert = prune_unet(dense, arch, ff_groups)
    return _assign(expert, _load_weights(weights, dtype), weights, arch), arch


def released_expert_dirs(root: str, allow_gaps: bool = False) -> List[str]:
    """The arch<k> folders of a released APTP model folder (e.g. APTP-Base-CC3M) in expert order
    (arch0, arch1, ..., arch10: by k, not by name), so that code k of AptpUNet.from_experts is
    APTP's expert k (its router's index). Raises FileNotFoundError when there is none and
    ValueError when some k is missing (a partial download would shift every later code), unless
    allow_gaps: then code i is the i-th folder present."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"released_expert_dirs: {root!r} is not a local folder; download the released model "
                                "(e.g. APTP-Base-CC3M, holding arch0, arch1, ...) first and pass its path: nothing is "
                                "downloaded")
    found = {}
    for name in os.listdir(root):
        match = re.fullmatch(r"arch(\d+)", name)
        if match and os.path.isdir(os.path.join(root, name)):
            found[int(match.group(1))] = os.path.join(root, name)
    if not found:
        raise FileNotFoundError(f"released_expert_dirs: no arch<k> folders in {root}")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing and not allow_gaps:
        raise ValueError(f"released_expert_dirs: {root} lacks arch{missing[0]}" +
                         (f" and {len(missing) - 1} more" if len(missing) > 1 else "") +
                         f" (has {', '.join(f'arch{k}' for k in sorted(found))}): code k would not be expert k; "
                         "pass allow_gaps=True to number the folders present 0, 1, ...")
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
        raise FileNotFoundError(f"load_released_expert: {directory} does not exist or is not a directory")
    weights = [w for w in _find(directory, WEIGHTS_FILE)
               if os.path.basename(os.path.dirname(os.path.abspath(w))) == "unet"]
    if not weights:
        raise FileNotFoundError(f"load_released_expert: no unet/{WEIGHTS_FILE} under {directory} (released experts "
                                f"keep their weights there; .bin weights are not read)")
    if len(weights) > 1:
        listed = ", ".join(os.path.relpath(os.path.dirname(w), directory) for w in weights)
        raise ValueError(f"load_released_expert: {len(weights)} checkpoints under {directory} ({listed}): pass the "
                         "folder of one of them")
    # beside the weights (older trainers' copy), the folder above unet/ (where the FID script
    # reads it; the trainer's copy in checkpoint-<step>/), then upwards to `directory`
    unet_dir = os.path.dirname(os.path.abspath(weights[0]))
    candidates = [unet_dir, os.path.dirname(unet_dir)]
    parts = os.path.relpath(os.path.dirname(unet_dir), directory).split(os.sep)
    candidates += [os.path.join(directory, *parts[:depth]) for depth in range(len(parts) - 1, -1, -1)
                   if parts[0] != os.pardir]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, RELEASED_ARCH_FILE)):
            return weights[0], os.path.join(folder, RELEASED_ARCH_FILE)
    raise FileNotFoundError(f"load_released_expert: no {RELEASED_ARCH_FILE} beside {weights[0]}, in the folder above "
                            f"it or further up to {directory}")


def _dense_block_type(name: str) -> str:
    """diffusers' block class of an APTP block class name (a diffusers name passes unchanged)."""
    from diffusers.models.unets import unet_2d_blocks
    match = _HALF_GATED.match(name)
    dense = _MID_GATED.get(name) or (match.group("block") if match else name)
    if not hasattr(unet_2d_blocks, dense) or dense.endswith("Gated"):
        if name.endswith("Gated"):
            raise NotImplementedError(f"load_released_expert: block type {name!r}: only APTP's HalfGated down / up "
                                      "blocks (depth gates on the last resnet and attention) and its WidthGated mid "
                                      "block are supported")
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
    ff_groups = saved_config.get("ff_gate_width", FF_GROUPS)
    if not isinstance(ff_groups, int):
        raise NotImplementedError(f"load_released_expert: {saved} gives ff_gate_width {ff_groups!r}; only one GEGLU "
                                  "group count for every feed-forward is supported")
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


def _check_dtype(dtype) -> None:
    check_dtype_argument("APTP expert loading", "dtype", dtype)


def _load_weights(path: str, dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """A safetensors file, cast tensor by tensor (one full-precision tensor at a time in memory)."""
    return read_safetensors(path, "APTP expert", dtype=dtype)


def _load_arch_vector(path: str) -> torch.Tensor:
    """The (1, D) gate probabilities of an arch_vector.pt, read without unpickling code."""
    try:
        vector = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # EOFError, UnpicklingError (not a plain tensor), RuntimeError (corrupt)
        raise ValueError(f"load_released_expert: {path} is not a tensor file torch.load(weights_only=True) can read "
                         f"(APTP saves the (1, D) gate probabilities with torch.save): {error}") from error
    if not isinstance(vector, torch.Tensor):
        raise ValueError(f"load_released_expert: {path} holds a {type(vector).__name__}, expected the (1, D) "
                         "tensor of gate probabilities APTP saves")
    return vector


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
