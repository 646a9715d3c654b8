"""Small helpers for editing nn.Module trees in place."""
from __future__ import annotations

from torch import nn


def swap_submodule(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Sets root.<name> = module (name dotted, as in named_modules()); returns what was there."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    previous = getattr(parent, attr)
    setattr(parent, attr, module)
    return previous


def check_swap_back(root: nn.Module, name: str, original: nn.Module, what: str) -> None:
    """ValueError when swap_back would move `original`'s weights to the meta device: its stand-in's
    weights are on meta under accelerate's sequential CPU offload (the hooks load them per call),
    and .to("meta") would drop the original's for good."""
    standing = next((p for p in root.get_submodule(name).parameters() if p.is_floating_point()), None)
    kept = next((p for p in original.parameters() if p.is_floating_point()), None)
    if standing is not None and kept is not None and standing.is_meta and not kept.is_meta:
        raise ValueError(f"{what}: the module at {name!r} holds its weights on the meta device (accelerate's "
                         "sequential CPU offload?), and putting the original back there would drop its weights: "
                         "remove the offload hooks first (pipe.remove_all_hooks(), or "
                         "accelerate.hooks.remove_hook_from_module(unet, recurse=True)), then enable them again")


def offload_hooked(module: nn.Module) -> bool:
    """Whether accelerate's hooks (sequential / model CPU offload, device maps) manage a submodule."""
    return any(hasattr(m, "_hf_hook") for m in module.modules())


def unwrapped(module: nn.Module) -> nn.Module:
    """The model inside torch.compile's and (Distributed)DataParallel's wrappers, whose module
    names would carry their `_orig_mod.` / `module.` prefixes; their parameters are the same."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if inner is None and isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = module.module
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def swap_back(root: nn.Module, name: str, original: nn.Module) -> nn.Module:
    """swap_submodule for a module that was kept outside `root` while another stood in its place:
    first moved to the stand-in's device and floating dtype, which a root.to(...) in between
    changed without reaching it (a UNet cast to bf16 while LinFusion was mounted). Returns the
    stand-in."""
    standing = next((p for p in root.get_submodule(name).parameters() if p.is_floating_point()), None)
    kept = next((p for p in original.parameters() if p.is_floating_point()), None)
    if standing is not None and kept is not None and (standing.device, standing.dtype) != (kept.device, kept.dtype):
        original.to(device=standing.device, dtype=standing.dtype)
    return swap_submodule(root, name, original)
