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
