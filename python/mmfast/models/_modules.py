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
