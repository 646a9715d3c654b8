"""Loads the compiled extension mmfast._C and says what it was built with."""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

    IMPORT_ERROR = None
except ImportError as error:  # not built, or built against another torch
    IMPORT_ERROR = error

try:
    from . import _build_info as build_info  # written by setup.py
except ImportError:
    build_info = None

# Device type -> dispatch key of the compiled kernels.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def loaded() -> bool:
    return IMPORT_ERROR is None


def has_kernel(qualname: str, device: torch.device) -> bool:
    """True when the compiled op `qualname` (e.g. "mmfast::linear_attention") runs on `device`."""
    if not loaded():
        return False
    key = _DISPATCH_KEYS.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)


def _compiled_kernels() -> dict:
    """{op name: device types with a compiled kernel} for every op of the mmfast namespace."""
    if not loaded():
        return {}
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mmfast::")]
    return {name: frozenset(d for d in _DISPATCH_KEYS if has_kernel(f"mmfast::{name}", torch.device(d)))
            for name in names}


# Computed once at import, so backend resolution is plain Python that torch.compile traces.
COMPILED_KERNELS = _compiled_kernels()


def describe_missing(device: torch.device) -> str:
    if not loaded():
        return f"mmfast._C failed to import: {IMPORT_ERROR}; {_rebuild_hint()}"
    if torch.device(device).type == "cuda":
        reason = getattr(build_info, "cuda_skipped", None) or "built without nvcc or a CUDA build of torch"
        return f"this build of mmfast has no CUDA kernels ({reason}); {_rebuild_hint()}"
    return f"mmfast has no kernels for device type {torch.device(device).type!r}"


def _rebuild_hint() -> str:
    """How to rebuild, naming the torch the extension was built against when it is not this one
    (the usual cause of an undefined symbol: `pip install .` builds in an isolated environment
    with the newest torch)."""
    built = getattr(build_info, "torch_version", None)
    against = (f"it was built against torch {built}, this is torch {torch.__version__}: "
               if built is not None and built != torch.__version__ else "")
    return (f"{against}rebuild against the installed torch with `pip install --no-build-isolation .` "
            "(`-e .` in a source checkout)")
