"""mmfast: compiled kernels for multimodal generative methods (LinFusion, APTP, Liquid, DiffDIS)."""
from __future__ import annotations

__version__ = "0.1.0"

from . import _extension  # noqa: F401  (loads the compiled ops first)
from . import memory, nn, ops, reference  # noqa: F401  (mmfast.memory / mmfast.nn work after `import mmfast`)
from ._backend import get_backend, set_backend, use_backend  # noqa: F401
from ._info import info  # noqa: F401
from .ops import linear_attention, linear_attention_apply, linear_attention_state  # noqa: F401

__all__ = ["__version__", "memory", "nn", "ops", "reference", "get_backend", "set_backend", "use_backend", "info",
           "linear_attention", "linear_attention_apply", "linear_attention_state"]
