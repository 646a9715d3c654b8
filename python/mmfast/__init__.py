"""mmfast: compiled kernels for multimodal generative methods (LinFusion, APTP, Liquid, DiffDIS)."""
from __future__ import annotations

__version__ = "0.1.0"

from . import _extension  # noqa: F401  (loads the compiled ops first)
from . import ops, reference  # noqa: F401
from ._info import info  # noqa: F401
from .ops import get_backend, linear_attention, set_backend, use_backend  # noqa: F401

if _extension.loaded():
    ops.register_linear_attention_fakes("mmfast")
    ops.register_linear_attention_autograd("mmfast", ops._native_ops())
