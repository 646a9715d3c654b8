"""LinFusion container: one GeneralizedLinearAttention per attn1 of a diffusers UNet.

Checkpoints use the official format (a directory with config.json holding
`modules_list` = [{module_name, dim_n, heads, projection_mid_dim}, ...] and
diffusion_pytorch_model.safetensors with keys `{i}.to_q.weight`, `{i}.to_q_.0.weight`,
..., `{i}.to_out.0.bias`), so the published Yuanshi/LinFusion-* directories load as is.
Nothing is downloaded: paths are local directories.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
from torch import nn

from ...ops._checks import check_dtype_argument, is_integer
from .._checkpoint_files import read_json, read_safetensors
from .._modules import check_swap_back, offload_hooked, swap_back, swap_submodule, unwrapped
from .attention import GeneralizedLinearAttention

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class ModuleSpec:
    """One entry of config.json's modules_list."""

    module_name: str
    dim_n: int
    heads: int
    projection_mid_dim: Optional[int] = None

    def dims(self) -> str:
        return f"dim_n={self.dim_n}, heads={self.heads}"

    @classmethod
    def from_config(cls, index: int, entry: dict) -> "ModuleSpec":
        required = ("module_name", "dim_n", "heads")
        missing = [key for key in required if key not in entry]
        if missing:
            raise ValueError(f"LinFusion: modules_list[{index}] lacks {missing}: {entry}")
        dim_n, heads = (_positive_int(index, entry, key) for key in ("dim_n", "heads"))
        mid_dim = entry.get("projection_mid_dim")
        if mid_dim is not None and mid_dim != -1:
            mid_dim = _positive_int(index, entry, "projection_mid_dim")
        if not isinstance(entry["module_name"], str) or dim_n % heads != 0:
            raise ValueError(f"LinFusion: modules_list[{index}] needs a module_name string and heads dividing dim_n: {entry}")
        return cls(entry["module_name"], dim_n, heads, mid_dim)


def _positive_int(index: int, entry: dict, key: str) -> int:
    """entry[key] as an int >= 1 (JSON may spell 320 as 320.0); ValueError naming the entry otherwise."""
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            isinstance(value, float) and not math.isfinite(value) or value != int(value) or value < 1:
        raise ValueError(f"LinFusion: modules_list[{index}].{key} must be an integer >= 1, got {value!r}: {entry}")
    return int(value)


class LinFusionMismatchError(ValueError):
    """A checkpoint or LinFusion instance does not fit the UNet it is used with."""


# --- finding the attn1 modules of a UNet -------------------------------------------------


def _is_self_attention(name: str, module: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return name.rsplit(".", 1)[-1] == "attn1" and isinstance(module, (Attention, GeneralizedLinearAttention))


def unet_attn1_specs(unet: nn.Module, projection_mid_dim: Optional[int] = None) -> List[ModuleSpec]:
    """The attn1 modules of `unet`, in named_modules() order (the official index order); names
    as in the plain UNet also when it is wrapped by torch.compile or (Distributed)DataParallel."""
    specs = []
    for name, module in unwrapped(unet).named_modules():
        if not _is_self_attention(name, module):
            continue
        if isinstance(module, GeneralizedLinearAttention):
            raise RuntimeError(f"LinFusion: {name} is already a LinFusion module; unmount() the UNet first")
        dim_n, query_dim = module.to_q.weight.shape
        if query_dim != dim_n:
            raise LinFusionMismatchError(
                f"LinFusion: {name} projects {query_dim} channels to {dim_n}; LinFusion needs query_dim == inner dim"
            )
        specs.append(ModuleSpec(name, dim_n, module.heads, projection_mid_dim))
    if not specs:
        raise LinFusionMismatchError("LinFusion: the UNet has no diffusers Attention module named attn1")
    return specs


def check_specs_match_unet(specs: List[ModuleSpec], unet: nn.Module, partial: bool = False) -> None:
    """Raises LinFusionMismatchError naming the first module that does not fit `unet`.

    partial=False also requires every attn1 of the UNet to be covered (a full LinFusion).
    """
    expected = unet_attn1_specs(unet)
    by_name = {spec.module_name: spec for spec in expected}
    for index, spec in enumerate(specs):
        found = by_name.get(spec.module_name)
        if found is None:
            raise LinFusionMismatchError(
                f"LinFusion: module {index} '{spec.module_name}' has no attn1 of that name in the UNet "
                f"(the UNet's first attn1 is '{expected[0].module_name}')"
            )
        if (found.dim_n, found.heads) != (spec.dim_n, spec.heads):
            raise LinFusionMismatchError(
                f"LinFusion: module {index} '{spec.module_name}' does not match the UNet: "
                f"the UNet expects {found.dims()}, the LinFusion checkpoint has {spec.dims()}"
            )
    covered = {spec.module_name for spec in specs}
    for spec in expected if not partial else ():
        if spec.module_name not in covered:
            raise LinFusionMismatchError(
                f"LinFusion: the UNet's '{spec.module_name}' ({spec.dims()}) has no module in the LinFusion checkpoint"
            )


def _mid_dim(dim_n: int, mid_dim_scale: Optional[int]) -> Optional[int]:
    if mid_dim_scale is None:
        return None
    if mid_dim_scale < 1 or dim_n % mid_dim_scale != 0:
        raise ValueError(f"LinFusion: mid_dim_scale={mid_dim_scale} must be >= 1 and divide dim_n={dim_n}")
    return dim_n // mid_dim_scale


# --- safe default dtypes per model family -----------------------------------------------


def unet_family(unet_or_config) -> str:
    """"sd15", "sd21", "sdxl" or "unknown", from a UNet's config (text width, added embeddings).

    Takes a UNet or its config (e.g. the dict UNet2DConditionModel.load_config returns)."""
    config = getattr(unet_or_config, "config", unet_or_config)
    if config is None:
        return "unknown"
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    if get("addition_embed_type") == "text_time":
        return "sdxl"
    text_width = get("cross_attention_dim")
    if isinstance(text_width, (list, tuple)):  # diffusers allows one width per block
        text_width = text_width[0] if len(set(text_width)) == 1 else None
    return {768: "sd15", 1024: "sd21"}.get(text_width, "unknown")


def recommended_dtype(pipe_or_unet, device) -> torch.dtype:
    """The dtype to run LinFusion in on `device`: fp32 on CPU; on GPUs fp16 for SD-1.5 and SD-XL
    (the official LinFusion-1-5 and -XL were distilled in fp16) and bf16 otherwise.

    SD-2.1 overflows fp16 (diffusers PR #9596 warns "Yuanshi/LinFusion-2-1 may cause numerical
    instability under fp16"; LinFusion-2-1 was distilled in bf16, and SD-2.1 itself needs
    upcast attention in fp16). mmfast's attention op accumulates its state in fp32, but the
    UNet around it still runs in the chosen dtype, so bf16 is the safe default there, and for
    any UNet this function does not recognise.
    """
    if torch.device(device).type == "cpu":
        return torch.float32
    family = unet_family(getattr(pipe_or_unet, "unet", pipe_or_unet))  # a pipeline, a UNet or a UNet config
    return torch.float16 if family in ("sd15", "sdxl") else torch.bfloat16


def _warn_if_unsafe_dtype(unet: nn.Module) -> None:
    dtype = next(unet.parameters()).dtype
    if dtype == torch.float16 and unet_family(unet) not in ("sd15", "sdxl"):
        family = unet_family(unet)
        warnings.warn(f"LinFusion: {'an' if family == 'unknown' else 'a'} {family} UNet in float16 may overflow (LinFusion-2-1 is known to); "
                      "use torch.bfloat16 (see mmfast.models.linfusion.recommended_dtype)", stacklevel=3)


# --- the container -----------------------------------------------------------------------


# The official construct_for's model_dict: pipeline name -> the checkpoint it downloads.
OFFICIAL_CHECKPOINTS = {
    "runwayml/stable-diffusion-v1-5": "Yuanshi/LinFusion-1-5",
    "SG161222/Realistic_Vision_V4.0_noVAE": "Yuanshi/LinFusion-1-5",
    "Lykon/dreamshaper-8": "Yuanshi/LinFusion-1-5",
    "stabilityai/stable-diffusion-2-1": "Yuanshi/LinFusion-2-1",
    "stabilityai/stable-diffusion-xl-base-1.0": "Yuanshi/LinFusion-XL",
}


def _no_local_checkpoint_message(pipe_or_unet, pipe_name_path: Optional[str] = None) -> str:
    config = getattr(pipe_or_unet, "config", None)
    name = pipe_name_path or (str(config.get("_name_or_path", "") or "") if isinstance(config, dict) else "")
    checkpoint = next((repo for key, repo in OFFICIAL_CHECKPOINTS.items() if name.rstrip("/").endswith(key)), None)
    which = (f"this pipeline ({name}) gets {checkpoint}" if checkpoint else
             "SD-1.5 pipelines get Yuanshi/LinFusion-1-5, SD-2.1 Yuanshi/LinFusion-2-1, SD-XL Yuanshi/LinFusion-XL")
    return ("LinFusion.construct_for: no pretrained= directory. The official construct_for downloads the checkpoint "
            f"({which}); mmfast loads only local files: pass pretrained='/path/to/that/checkpoint' (its config.json "
            "and diffusion_pytorch_model.safetensors), or load_pretrained=False for randomly initialised modules "
            "to distill")


class LinFusion(nn.Module):
    """Holds the LinFusion modules as children "0", "1", ... (the official state-dict keys)."""

    def __init__(self, modules_list: List[dict], partial: bool = False):
        """partial: the modules replace only some of the UNet's attn1 layers (saved in config.json)."""
        super().__init__()
        self.partial = partial
        self.specs = [spec if isinstance(spec, ModuleSpec) else ModuleSpec.from_config(index, spec)
                      for index, spec in enumerate(modules_list)]
        for index, spec in enumerate(self.specs):
            self.add_module(str(index), GeneralizedLinearAttention(spec.dim_n, spec.heads, spec.projection_mid_dim))
        # (UNet, attn1 name, original attn1) per mounted module. A plain list so the UNet
        # is not registered as a child of LinFusion.
        self._mounted: list = []

    @property
    def modules_list(self) -> List[dict]:
        return [asdict(spec) for spec in self.specs]

    def attention_modules(self) -> List[GeneralizedLinearAttention]:
        return [getattr(self, str(index)) for index in range(len(self.specs))]

    # --- construction ------------------------------------------------------------------

    @classmethod
    def from_unet(cls, unet: nn.Module, mid_dim_scale: Optional[int] = None,
                  init_from_unet: bool = False, module_names: Optional[List[str]] = None) -> "LinFusion":
        """Random-init LinFusion sized for `unet`; optionally copies the attn1 q/k/v/out weights.

        mid_dim_scale: MLP width M = C // mid_dim_scale (16 for SD-XL); None gives M = C.
        module_names: replace only these attn1 layers (a partial LinFusion); None: all of them.
        """
        specs = [
            ModuleSpec(spec.module_name, spec.dim_n, spec.heads, _mid_dim(spec.dim_n, mid_dim_scale))
            for spec in unet_attn1_specs(unet)
        ]
        if module_names is not None:
            unknown = sorted(set(module_names) - {spec.module_name for spec in specs})
            if unknown or not module_names:
                raise LinFusionMismatchError(f"LinFusion: module_names must name attn1 layers of the UNet; "
                                             f"unknown: {unknown}" if unknown else "LinFusion: module_names is empty")
            specs = [spec for spec in specs if spec.module_name in set(module_names)]
        model = cls(specs, partial=module_names is not None)
        if init_from_unet:
            for spec, module in zip(specs, model.attention_modules()):
                module.load_projections_from(unet.get_submodule(spec.module_name))
        return model

    @classmethod
    def construct_for(cls, pipe_or_unet=None, pretrained: Optional[str] = None, mid_dim_scale: Optional[int] = None,
                      init_from_unet: bool = False, module_names: Optional[List[str]] = None,
                      load_pretrained: bool = True, pretrained_model_name_or_path: Optional[str] = None, *,
                      pipeline=None, unet=None, pipe_name_path: Optional[str] = None) -> "LinFusion":
        """Loads LinFusion from the local directory `pretrained` (or builds it) and mounts it.

        Accepts a diffusers pipeline (uses its .unet) or a UNet, positionally or as the official
        keywords pipeline= / unet= (with both, as officially, the modules mount on `unet`). The
        modules take the UNet's device and dtype. load_pretrained (the official argument): True
        needs `pretrained`, a local copy of the checkpoint (the official construct_for downloads
        Yuanshi/LinFusion-* by the pipeline's name, or by pipe_name_path; mmfast never downloads,
        so ValueError names the checkpoint to fetch); False builds randomly initialised modules
        (for distillation: LinFusionDistiller), with mid_dim_scale, init_from_unet and
        module_names as in from_unet. pretrained_model_name_or_path: the official name of
        `pretrained`, so the notebooks' call construct_for(pipe, pretrained_model_name_or_path=DIR)
        ports as it is; it must name a local directory (a Hub id gets FileNotFoundError with the
        download command). Unlike the official code, a path with load_pretrained=False is an
        error, not ignored. Raises ValueError when no pipeline or UNet is given, or one is given
        both positionally and by keyword, TypeError for something that is neither.
        """
        if pretrained_model_name_or_path is not None:
            if pretrained is not None:
                raise ValueError("LinFusion.construct_for: pass pretrained or pretrained_model_name_or_path, not both")
            pretrained = pretrained_model_name_or_path
        if pipe_or_unet is not None and (pipeline is not None or unet is not None):
            raise ValueError("LinFusion.construct_for: pass the pipeline or UNet positionally or as pipeline= / unet=, "
                             "not both")
        if isinstance(pretrained, nn.Module):  # the official positional order: (pipeline, unet, load_pretrained, ...)
            raise TypeError("LinFusion.construct_for: the second positional argument is `pretrained` (a local "
                            "directory), got a module: pass the UNet as unet=unet (the official signature's "
                            "construct_for(pipeline, unet) order is not mmfast's)")
        named = pipe_or_unet if pipe_or_unet is not None else pipeline
        unet = unet if unet is not None else getattr(named, "unet", named)
        unet = unwrapped(unet) if isinstance(unet, nn.Module) else unet
        if unet is None:
            raise ValueError("LinFusion.construct_for: no pipeline or UNet given (expected a diffusers pipeline with a "
                             ".unet, or a UNet2DConditionModel)")
        if not isinstance(unet, nn.Module) and not hasattr(unet, "config"):  # e.g. a tensor in the pipeline's place
            raise TypeError(f"LinFusion.construct_for: expected a diffusers pipeline with a .unet, or a "
                            f"UNet2DConditionModel, got {type(unet).__name__}")
        if pretrained is None and load_pretrained:
            raise ValueError(_no_local_checkpoint_message(named if named is not None else unet, pipe_name_path))
        if not isinstance(unet, nn.Module):
            raise TypeError(f"LinFusion.construct_for: expected a diffusers pipeline with a .unet, or a "
                            f"UNet2DConditionModel, got {type(unet).__name__}")
        if pretrained is None:
            model = cls.from_unet(unet, mid_dim_scale=mid_dim_scale, init_from_unet=init_from_unet,
                                  module_names=module_names)
        else:
            if not load_pretrained:
                raise ValueError("LinFusion.construct_for: pretrained= and load_pretrained=False contradict each other")
            if mid_dim_scale is not None or init_from_unet or module_names is not None:
                raise ValueError("LinFusion.construct_for: mid_dim_scale/init_from_unet/module_names apply only "
                                 "with load_pretrained=False (a checkpoint names its own modules)")
            model = cls.from_pretrained(pretrained)
        model.mount_to(unet)
        return model

    # --- mounting ------------------------------------------------------------------------

    @property
    def is_mounted(self) -> bool:
        return bool(self._mounted)

    def mount_to(self, unet: nn.Module) -> "LinFusion":
        """Replaces each attn1 of `unet` by its LinFusion module (moved to the UNet's device/dtype)."""
        if self.is_mounted:
            raise RuntimeError("LinFusion: already mounted; call unmount() first")
        unet = unwrapped(unet)
        reference_param = next(unet.parameters())
        if reference_param.is_meta and offload_hooked(unet):
            raise ValueError("LinFusion.mount_to: the UNet's weights are on the meta device under accelerate's "
                             "hooks (sequential CPU offload), where LinFusion's would be dropped: mount LinFusion "
                             "first, then enable the offload (pipe.enable_sequential_cpu_offload())")
        check_specs_match_unet(self.specs, unet, self.partial)
        _warn_if_unsafe_dtype(unet)
        self.to(device=reference_param.device, dtype=reference_param.dtype)
        for spec, module in zip(self.specs, self.attention_modules()):
            self._mounted.append((unet, spec.module_name, swap_submodule(unet, spec.module_name, module)))
        return self

    def unmount(self) -> None:
        """Puts the original attn1 modules (the same objects) back, moved to the device and dtype
        LinFusion's modules have then (a pipe.to(...) while mounted does not reach them)."""
        if not self.is_mounted:
            raise RuntimeError("LinFusion: not mounted")
        for unet, name, original in self._mounted:  # all checked before any is swapped
            check_swap_back(unet, name, original, "LinFusion.unmount")
        for unet, name, original in reversed(self._mounted):
            swap_back(unet, name, original)
        self._mounted = []

    def original_attention_modules(self) -> List[nn.Module]:
        """The UNet's own attn1 modules while mounted (the distillation teacher's layers)."""
        if not self.is_mounted:
            raise RuntimeError("LinFusion: not mounted")
        return [original for _, _, original in self._mounted]

    @contextlib.contextmanager
    def unmounted(self):
        """Temporarily puts the original attn1 modules back (e.g. the distillation teacher)."""
        if not self.is_mounted:
            raise RuntimeError("LinFusion: not mounted")
        for unet, name, original in self._mounted:
            check_swap_back(unet, name, original, "LinFusion.unmounted")
        for unet, name, original in self._mounted:
            swap_back(unet, name, original)
        try:
            yield
        finally:
            for (unet, name, _), module in zip(self._mounted, self.attention_modules()):
                swap_submodule(unet, name, module)

    def set_token_chunk_size(self, chunk: Optional[int]) -> None:
        """Exact chunked inference for very large token counts (see GeneralizedLinearAttention)."""
        if chunk is not None and (not is_integer(chunk) or chunk < 1):
            raise ValueError(f"LinFusion: token chunk size must be an int >= 1 or None, got {chunk!r}")
        for module in self.attention_modules():
            module.token_chunk_size = chunk

    # --- checkpoints ---------------------------------------------------------------------

    def save_pretrained(self, directory: str) -> None:
        """Writes config.json and diffusion_pytorch_model.safetensors (official format)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        config = {"_class_name": "LinFusion", "modules_list": self.modules_list}
        if self.partial:
            config["partial"] = True
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)
        tensors = {key: value.detach().contiguous().cpu() for key, value in self.state_dict().items()}
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str, torch_dtype: Optional[torch.dtype] = None) -> "LinFusion":
        """Loads a local checkpoint directory (safetensors only; never pickle). torch_dtype: a
        torch.dtype to cast to (None: as stored); TypeError otherwise. Raises FileNotFoundError
        for a missing directory or file, ValueError for a config.json that is not JSON or not a
        LinFusion config and for a weights file that is not readable safetensors (e.g. truncated),
        LinFusionMismatchError for tensors that disagree with the config."""
        check_dtype_argument("LinFusion.from_pretrained", "torch_dtype", torch_dtype)
        config_path, weights_path = _checkpoint_paths(directory)
        config = read_json(config_path, "LinFusion")
        if not isinstance(config, dict) or "modules_list" not in config:
            raise ValueError(f"LinFusion: {config_path} has no 'modules_list'; is this a LinFusion checkpoint?")
        state = read_safetensors(weights_path, "LinFusion")
        with torch.device("meta"):  # no random init of weights that are about to be replaced
            model = cls(config["modules_list"], partial=bool(config.get("partial", False)))
        _check_state_dict(model, state, weights_path)
        model.load_state_dict(state, strict=True, assign=True)
        if torch_dtype is not None:
            model.to(torch_dtype)
        return model


def _checkpoint_paths(directory: str):
    if os.path.isfile(directory):
        raise FileNotFoundError(f"LinFusion: {directory!r} is a file; pass the checkpoint directory that holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"LinFusion: checkpoint directory {directory!r} does not exist. mmfast never downloads; download the "
            "checkpoint first (e.g. `hf download Yuanshi/LinFusion-1-5 --local-dir DIR`) and pass DIR"
        )
    paths = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"LinFusion: {path} is missing; a LinFusion checkpoint directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    return paths


def _check_state_dict(model: LinFusion, state: dict, weights_path: str) -> None:
    """Raises naming the first module whose tensors are missing, extra or of another shape."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for index, spec in enumerate(model.specs):
        prefix = f"{index}."
        want = {k: s for k, s in expected.items() if k.startswith(prefix)}
        have = {k: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
        where = f"LinFusion: {weights_path}: module {index} '{spec.module_name}' ({spec.dims()})"
        if set(want) != set(have):
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            raise LinFusionMismatchError(f"{where}: missing keys {missing}, unexpected keys {extra}")
        for key, shape in want.items():
            if have[key] != shape:
                raise LinFusionMismatchError(f"{where}: {key} has shape {have[key]}, config.json implies {shape}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise LinFusionMismatchError(f"LinFusion: {weights_path} has keys of no module in config.json: {unknown[:5]}")
