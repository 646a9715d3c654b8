"""Helpers every Triton op family shares: interpreter detection, exact conversion to fp32,
runnability checks, device guard, stride normalisation and device queries."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older releases read the variable
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Under TRITON_INTERPRET=1 (set before triton is imported) kernels run on CPU tensors.
INTERPRET = _interpreting()


# The interpreter's tl.dot multiplies fp32 operands in full fp32 whatever input_precision says;
# a GPU's "tf32" dot reads 10 of their 23 significand bits. dot_operand rounds like the GPU
# under the interpreter, so CPU tests see the GPU's error.
TF32_EMULATION = tl.constexpr(INTERPRET)


@triton.jit
def dot_operand(x, DOT_PREC: tl.constexpr):
    """x as a tf32 tensor core reads it when DOT_PREC is "tf32" under the interpreter: the low
    13 significand bits cleared (truncation, the larger of the GPU's possible errors: an
    operand not rounded by cvt.rna first is truncated). Unchanged otherwise."""
    if TF32_EMULATION and DOT_PREC == "tf32" and x.dtype == tl.float32:
        return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    else:
        return x


@triton.jit
def to_fp32(x):
    """x in fp32, exactly: bf16 through its bits (a bf16 is the top half of an fp32), since a
    plain conversion flushes bf16 denormals to zero under the interpreter, which would turn
    relu(denormal) > 0 into 0 and its gradient 1 into 0."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


def check_runnable(op: str, *tensors: Tensor) -> None:
    """Raises TypeError for float64 (no Triton kernels) and for tensors Triton cannot run on."""
    for t in tensors:
        if t.dtype == torch.float64:
            raise TypeError(f"{op}: the triton backend has no float64 kernels; use backend='native' "
                            "(or backend='reference') for float64 inputs")
    device = tensors[0].device
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        raise TypeError(f"{op}: the triton backend runs on CUDA tensors (CPU tensors only under "
                        f"TRITON_INTERPRET=1, set before triton is imported), got {device.type} tensors")


def device_guard(t: Tensor):
    """Triton launches on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def last_dim_unit(t: Tensor) -> Tensor:
    """Kernels index the last dim with stride 1 and every other dim through its stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


# --- launch configs -----------------------------------------------------------------------
# On a GPU a kernel wrapped by `autotuned` times each (num_warps, num_stages) of its sweep on
# the first call per key (its head dims, constexpr variant and the argument dtypes) and keeps
# the fastest. Under the interpreter, where timing means nothing, and with
# MMFAST_TRITON_AUTOTUNE=0 (no benchmarking on the first call: reproducible launches), every
# kernel runs its fixed config.
AUTOTUNE = not INTERPRET and os.environ.get("MMFAST_TRITON_AUTOTUNE", "1") != "0"


def launch_configs(fixed: tuple[int, int], sweep: "list[tuple[int, int]]") -> "list[triton.Config]":
    """triton.Config per (num_warps, num_stages): the sweep (which must hold `fixed`) when
    autotuning, else `fixed` alone (Triton's autotuner does not time a single config)."""
    if fixed not in sweep:
        raise ValueError(f"the fixed launch config {fixed} must be one of the sweep {sweep}")
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in (sweep if AUTOTUNE else [fixed])]


def autotuned(kernel, fixed: tuple[int, int], sweep: "list[tuple[int, int]]", key: "list[str]"):
    """kernel behind triton.autotune over launch_configs(fixed, sweep), keyed on `key` (Triton
    adds every tensor argument's dtype to the key). Only for kernels whose outputs are written,
    never accumulated: the autotuner runs each config on the real arguments."""
    return triton.autotune(configs=launch_configs(fixed, sweep), key=key)(kernel)
