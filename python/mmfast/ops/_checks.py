"""Input-check helpers every op family shares. Errors name what was expected: ValueError
for shapes and values, TypeError for dtypes and devices, prefixed with the op's name."""
from __future__ import annotations

import numbers

import torch

from .._dtypes import FLOAT_DTYPES

_FLOAT_NAMES = "float32, float16, bfloat16 or float64"


def is_integer(value) -> bool:
    """A Python, numpy or symbolic (torch.SymInt) integer: anything with __index__, not a bool; a
    tensor only when it is a 0-dim integer one (torch.Tensor has __index__ for every dtype, and
    int() truncates a float one: torch.tensor(1.7) passed as 1)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return not isinstance(value, bool) and hasattr(type(value), "__index__")


def check_dtype_argument(where: str, name: str, dtype) -> None:
    """TypeError unless dtype is a floating-point torch.dtype (a model's weights) or None (a string
    such as "bfloat16" is the usual slip; an integer dtype failed deep in load_state_dict)."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        hint = f" (torch.{dtype}?)" if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype) \
            else ""
        raise TypeError(f"{where}: {name} must be a torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}{hint}")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"{where}: {name} must be a floating-point dtype for the weights (torch.float32, "
                        f"torch.bfloat16, torch.float16), got {dtype}")


def is_real(value) -> bool:
    """A Python or numpy real number (numbers.Real), not a bool."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be {_FLOAT_NAMES}, got {t.dtype}")


def check_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{op}: {name} must be a {rank}-D {layout} tensor, got shape {tuple(t.shape)}")


def check_same(op: str, tensors: dict, attr: str, error=TypeError) -> None:
    """All `tensors` ({name: tensor}) agree in `attr` ("dtype" or "device")."""
    values = {name: getattr(t, attr) for name, t in tensors.items()}
    if len(set(values.values())) > 1:
        described = ", ".join(f"{n}: {v}" for n, v in values.items())
        raise error(f"{op}: all inputs must have the same {attr}, got {described}")


def check_tensors(op: str, tensors: dict, optional: tuple = ()) -> None:
    """TypeError unless every value of `tensors` ({name: value}) is a torch.Tensor (those named in
    `optional` may also be None): a list or a number would otherwise fail deep inside with an
    AttributeError or the dispatcher's cast error."""
    for name, value in tensors.items():
        if value is None and name in optional:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def check_no_forward_transforms(op: str, backend: str, *tensors) -> None:
    """NotImplementedError under torch.func's differentiating transforms (grad, vjp, jacrev, jvp,
    jacfwd, hessian) and forward-mode AD, for an op with a gradient on a compiled backend: its
    gradient is a torch.library backward formula, which those cannot use (PyTorch gives jvp a
    silent zero tangent, forward_ad none, and grad a misleading autograd.Function error). The
    reference backend (plain torch ops) takes every transform; vmap and reverse mode work on all.
    A grad transform is found under any vmap levels around it (grad(vmap(f))). Two C calls when no
    transform is active; skipped while torch.compile traces."""
    functorch, forward_ad = torch._C._functorch, torch.autograd.forward_ad
    transform_active = functorch.maybe_current_level() is not None
    if (not transform_active and forward_ad._current_level < 0) or backend == "reference" \
            or torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is None:
            continue
        while transform_active and functorch.is_functorch_wrapped_tensor(t):
            if functorch.is_gradtrackingtensor(t):
                raise NotImplementedError(
                    f"{op}: torch.func's differentiating transforms (grad, vjp, jacrev, jvp, jacfwd, hessian) are "
                    "not supported on its compiled backends: their gradients are backward formulas registered with "
                    "torch.library, which these transforms cannot use (jvp would get a silent zero tangent). "
                    "Differentiate with torch.autograd (loss.backward(), torch.autograd.grad; "
                    "torch.autograd.functional.jacobian / jvp use reverse mode), or pass backend='reference'. "
                    "torch.func.vmap is supported.")
            t = functorch.get_unwrapped(t)  # a vmap level: look beneath it
        if forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"{op}: forward-mode AD (torch.autograd.forward_ad) is not supported on its compiled backends: they "
                "register a backward formula only, and PyTorch would drop the tangent without a word. Use reverse "
                "mode (torch.autograd.grad), torch.autograd.functional.jvp (which computes a JVP with it), or "
                "backend='reference'.")
