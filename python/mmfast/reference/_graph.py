"""Autograd plumbing the references share."""
from __future__ import annotations

import torch


def connected(y: torch.Tensor, inputs) -> torch.Tensor:
    """y still in the graph of every input that requires grad when nothing read it (an empty
    batch, nothing kept): zero gradients, as the kernels give, instead of none. A zero-element
    sum reads no value (0 * x would turn a masked NaN into NaN)."""
    if torch.is_grad_enabled():
        for t in inputs:
            if t is not None and t.requires_grad:
                y = y + t.flatten()[:0].sum().to(y.dtype)
    return y
