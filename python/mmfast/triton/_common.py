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
def tf32_high(x):
    """x's top 11 significant bits (the low 13 of its 23 stored ones cleared): exact in tf32;
    x - tf32_high(x) is exact in fp32."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def tf32_round(x):
    """x rounded to tf32's 11 significant bits, to nearest (ties away from zero, as cvt.rna),
    the low 13 bits then cleared: exact as a tf32 operand. inf and NaN are left as they are."""
    bits = x.to(tl.uint32, bitcast=True)
    special = (bits & 0x7F800000) == 0x7F800000
    rounded = tl.where(special, bits, (bits + 0x1000) & 0xFFFFE000)
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def dot_operand(x, DOT_PREC: tl.constexpr):
    """x as a tf32 tensor core reads it when DOT_PREC is "tf32" under the interpreter: the low
    13 significand bits cleared (truncation, the larger of the GPU's possible errors: an
    operand not rounded by cvt.rna first is truncated). Unchanged otherwise."""
    if TF32_EMULATION and DOT_PREC == "tf32" and x.dtype == tl.float32:
        return tf32_high(x)
    else:
        return x


@triton.jit
def split_tf32(x):
    """(hi, lo) with hi + lo = x, hi exact in tf32 and lo as a tf32 dot reads it (|lo| < 2^-10 |x|).
    An infinite x is its own hi: its lo is 0, not inf - inf = NaN."""
    hi = tf32_high(x)
    return hi, dot_operand(tl.where(hi == x, 0.0, x - hi), "tf32")


@triton.jit
def split_dot(a, b, acc, DOT_PREC: tl.constexpr, SPLIT_A: tl.constexpr):
    """acc + a @ b (acc may be None) where one operand holds values exact in tf32 (16-bit
    tokens widened to fp32: 11 significant bits at most) and the other (a if SPLIT_A, else b)
    is any fp32. With DOT_PREC "tf32" the fp32 operand is split as hi + lo (tf32_high, then the
    exact rest) and multiplied twice: products good to about 2^-20 instead of tf32's 2^-10, for
    twice one tf32 dot (tf32x3's third product, the other operand's lo times this one's hi, is
    zero when the other operand is exact). The CUDA kernels split theirs the same way (cp.async:
    16-bit hi + lo, split_pair; register-staged: tf32 hi + lo, mma_tile). A sum that cancels (a
    gradient of identical tokens) keeps fp32-level accuracy. Other precisions: one dot as
    DOT_PREC says."""
    if DOT_PREC == "tf32":
        if SPLIT_A:
            exact = dot_operand(b, DOT_PREC)
            hi, lo = split_tf32(a)
            acc = tl.dot(hi, exact, acc, input_precision="tf32")
            acc = tl.dot(lo, exact, acc, input_precision="tf32")
        else:
            exact = dot_operand(a, DOT_PREC)
            hi, lo = split_tf32(b)
            acc = tl.dot(exact, hi, acc, input_precision="tf32")
            acc = tl.dot(exact, lo, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


# The interpreter converts fp32 to bf16 by truncation (and garbles bf16 subnormals); a GPU
# rounds to nearest even. output_value rounds like the GPU under the interpreter.
BF16_ROUNDING_EMULATION = tl.constexpr(INTERPRET)


@triton.jit
def output_value(v, out_ptr):
    """fp32 v in out_ptr's element type, rounded to nearest even (ties to even) as a GPU's
    conversion does; for bf16 under the interpreter the rounding is done on the bits (NaN stays
    NaN, a value past bf16's largest becomes inf)."""
    if BF16_ROUNDING_EMULATION and out_ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(out_ptr.dtype.element_ty)


@triton.jit
def to_fp32(x):
    """x in fp32, exactly: bf16 through its bits (a bf16 is the top half of an fp32), since a
    plain conversion flushes bf16 denormals to zero under the interpreter, which would turn
    relu(denormal) > 0 into 0 and its gradient 1 into 0."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def divide(x, y):
    """x / y correctly rounded, as torch and the interpreter divide ('/' on fp32 compiles to
    div.full.f32 on a GPU, off by up to 2 ulp: an error the cancelling backward sums magnify);
    y cast to x's dtype and broadcast to its shape."""
    return tl.math.div_rn(x, tl.broadcast_to(y.to(x.dtype), x.shape))


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


# Rows, codes and pixels the kernels index as program id * block + lane in int32 (int64 program
# ids cost registers and spills: scripts/triton_report.py); the native kernels index in int64.
INT32_EXTENT_LIMIT = 2**31 - 4096


def check_int32_extent(op: str, what: str, count: int) -> None:
    """ValueError past INT32_EXTENT_LIMIT (the products would wrap and pass the bounds masks)."""
    if count > INT32_EXTENT_LIMIT:
        raise ValueError(f"{op}: the triton backend indexes {what} in int32, at most {INT32_EXTENT_LIMIT}, got "
                         f"{count}; use backend='native'")


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
