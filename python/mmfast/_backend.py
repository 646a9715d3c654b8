"""Which implementation runs an mmfast op: set_backend / use_backend / get_backend and "auto".

Backends, the same for every op family:
  "native"    the compiled C++ (CPU) and CUDA kernels: torch.ops.mmfast.<op>
  "triton"    the Triton twins: torch.ops.mmfast_triton.<op> (CUDA tensors; CPU tensors only
              under TRITON_INTERPRET=1, which is how the tests run them)
  "reference" the pure-PyTorch fp32 references of mmfast.reference
  "auto"      "native" when the extension has a kernel for the op called on the tensors'
              device, else an error naming the slower backends: never a silent fallback.

Pick one per call (backend="triton"), for a scope (`with mmfast.use_backend("triton")`,
this thread and asyncio task only) or for the process (mmfast.set_backend("triton")).

This module knows op names only: the Triton kernels are imported by name the first time
the "triton" backend is asked for, so no backend module imports mmfast.ops.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from typing import Optional

import torch

from . import _extension

BACKENDS = ("auto", "native", "triton", "reference")
# Backends whose ops live in a torch.ops namespace, and the module that registers them.
NAMESPACES = {"native": "mmfast", "triton": "mmfast_triton"}
_KERNEL_MODULES = {"triton": "mmfast.triton"}

# use_backend's scope: a context variable, so a scope stays with its thread and its asyncio task
# (a thread-local leaked between tasks sharing the event loop's thread)
_scoped_backend: contextvars.ContextVar = contextvars.ContextVar("mmfast_backend", default=None)
_global_backend = "auto"
_imported_kernel_modules: set = set()


def set_backend(backend: str) -> None:
    """Sets the default backend of every mmfast op for this process: "auto" (the compiled op of
    the tensors' device; the default), "native" (the compiled C++ / CUDA op), "triton" (the
    Triton twins: CUDA, or CPU under TRITON_INTERPRET=1) or "reference" (mmfast.reference, the
    plain-PyTorch fp64-checked definition). Raises ValueError for any other name; an op
    without a kernel for the chosen backend on its device raises when called."""
    global _global_backend
    validate(backend)
    _global_backend = backend


def get_backend() -> str:
    """The backend ops use when none is passed: the innermost use_backend, else set_backend's."""
    return _scoped_backend.get() or _global_backend


@contextlib.contextmanager
def use_backend(backend: str):
    """Context manager: ops called inside use `backend` (this thread and asyncio task only: a
    contextvars scope)."""
    validate(backend)
    token = _scoped_backend.set(backend)
    try:
        yield
    finally:
        _scoped_backend.reset(token)


def validate(backend: str) -> None:
    if backend not in BACKENDS:
        hint = (" (a backend is an implementation, not a device: the device is the tensors' own, so move them "
                "with .to('cuda'))" if backend in ("cuda", "cpu", "gpu") else "")
        raise ValueError(f"mmfast: backend must be one of {BACKENDS}, got {backend!r}{hint}")


def native_available(op: str, device: torch.device) -> bool:
    """True when the compiled op mmfast::`op` runs on `device`: a CPU or CUDA kernel, or on
    the meta device (shapes and dtypes only) the op's fake kernel, which every op has."""
    kernels = _extension.COMPILED_KERNELS.get(op)
    if kernels is None:
        return False
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type  # ~1 us per op call saved
    return kind == "meta" or kind in kernels


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """The concrete backend ("native", "triton" or "reference") that runs `op` on `device`."""
    backend = backend or get_backend()
    validate(backend)
    if backend in ("native", "auto") and not native_available(op, device):
        what = "the native backend has no kernel" if backend == "native" else "no compiled kernel"
        slower = "Use backend='triton' or backend='reference'" if backend == "native" else \
            "Pass backend='triton' or backend='reference' explicitly to run a slower path"
        raise RuntimeError(f"mmfast: {what} for {torch.device(device).type} tensors in {op} "
                           f"({_extension.describe_missing(device)}). {slower}.")
    return "native" if backend == "auto" else backend


def op_overload(op: str, backend: str):
    """torch.ops.<namespace of backend>.<op>.default, importing the backend's kernels on first use."""
    if backend in _KERNEL_MODULES:
        _import_kernel_module(_KERNEL_MODULES[backend])
    return getattr(getattr(torch.ops, NAMESPACES[backend]), op).default


def _import_kernel_module(name: str) -> bool:
    # Runs once, at trace time under torch.compile (an import cannot be traced).
    if name not in _imported_kernel_modules:
        importlib.import_module(name)
        _imported_kernel_modules.add(name)
    return True


# What torch.compiler.assume_constant_result(_import_kernel_module) does (it sets only this flag,
# tests/test_linear_attention.py checks that it still does), without importing torch._dynamo
# when mmfast is imported: that import alone took ~1 s of `import mmfast`.
_import_kernel_module._dynamo_marked_constant = True
