"""The Triton twins of the linear-attention ops: torch.ops.mmfast_triton.linear_attention,
_state, _apply, _apply_backward and _state_backward, with the schemas, checks, fake kernels
and autograd of the native ops (python/mmfast/ops/linear_attention.py). The kernels and
their design are in linear_attention_kernels.py.
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..ops.linear_attention import (check_apply, check_apply_backward, check_kv, check_qkv, check_state_backward,
                                    register_fakes_and_autograd)
from ..reference.linear_attention import FEATURE_MAPS
from . import linear_attention_kernels as kernels
from ._common import autotuned, check_int32_extent, check_runnable, device_guard, device_sm_count, last_dim_unit

OP = "linear_attention"
# Token rows per program in the row-parallel kernels / per loop step in the chunked ones.
_BLOCK_N = 64
# Tokens per chunk of the split-N reductions on CPU (interpreter).  Small so that
# N > 256 exercises the multi-chunk reduction; the GPU picks from the SM count.
_CPU_CHUNK = 256
# Launch configs (num_warps, num_stages): FIXED_LAUNCH under the interpreter and with
# MMFAST_TRITON_AUTOTUNE=0, else the fastest of the kernel's sweep, timed on the first call per
# head dims, variant and dtype (triton.autotune).  A sweep holds the configs that compile for
# sm_90 without spills at D = 64 in every dtype (benchmarks/results/
# 2026-12-06-triton-sm90-linear-attention-div-rn.md, from scripts/triton_report.py): 4 warps spill
# nearly everywhere, 8 warps with 1 stage in the fp32 state and dq kernels, with 3 stages in the
# fp32 dk / dv kernels; 16 warps (128 registers) spill in the dq, dk and dS / dm kernels since
# the backward's hi + lo products (split_dot), and stay in the dv kernel's sweep only.
FIXED_LAUNCH = (8, 2)
LAUNCH_SWEEPS = {
    "outer_sum_kernel": [(8, 2), (8, 3)],
    "apply_kernel": [(8, 2), (8, 1), (8, 3)],
    "apply_backward_dq_kernel": [(8, 2), (8, 3)],
    "state_backward_dk_kernel": [(8, 2), (8, 1)],
    "state_backward_dv_kernel": [(8, 2), (8, 1), (16, 2)],
}
# Elements of S or m per program of the chunk reduction.
_REDUCE_BLOCK = 1024


# --- host helpers ---------------------------------------------------------------------


def _feature_tile(d: int) -> int:
    return min(max(16, triton.next_power_of_2(d)), 64)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _half_dot(dtype: torch.dtype, feature_map: str) -> bool:
    """phi(k)^T v of the state on half-precision MMAs: fp16 with relu or the identity map, where
    phi(k) is the fp16 k itself (exact products). elu1's exp(k) leaves fp16's range (below 6e-8
    for k < -17: S and m of such keys rounded to 0) and bf16 would keep 8 bits of phi(k):
    those go through tf32 (11 bits, fp32's range) on fp32 operands instead."""
    return dtype == torch.float16 and feature_map != "elu1"


# False streams all of N through one program per (b, h, tile), the design of fla-org's
# flash-bidirectional-linear-attention; the benchmarks time both designs with this switch.
SPLIT_SEQUENCE = True


def _chunk_size(n: int, programs_per_chunk: int, device: torch.device) -> int:
    """Tokens per program of the split-N reductions (a multiple of _BLOCK_N)."""
    if not SPLIT_SEQUENCE:
        chunk = n
    elif device.type != "cuda":
        chunk = _CPU_CHUNK
    else:
        # About 4 programs per SM; chunks of at least 4 row blocks keep the fp32
        # workspace (chunks * B*H * Dk * Dv * 4 bytes) and the reduction small.
        sms = device_sm_count(device)
        chunks = max(1, triton.cdiv(4 * sms, max(1, programs_per_chunk)))  # 0 programs: B or H is 0
        chunk = max(4 * _BLOCK_N, triton.cdiv(n, chunks))
    return triton.cdiv(chunk, _BLOCK_N) * _BLOCK_N


# --- constexprs of each kernel (the launches and scripts/triton_report.py share them) ----


def outer_sum_meta(da: int, db: int, dtype: torch.dtype, feature_map: str, weighted: bool) -> dict:
    """outer_sum_kernel's constexprs: the state (weighted=False: a = k, b = v) or the dS / dm of
    apply_backward (weighted=True: b / z and w)."""
    ba, bb = _feature_tile(da), _feature_tile(db)
    return dict(FM=FEATURE_MAPS.index(feature_map), HAS_Z=weighted, HAS_W=weighted,
                HALF_DOT=not weighted and _half_dot(dtype, feature_map), DOT_PREC=_dot_precision(dtype),
                BLOCK_N=_BLOCK_N, BA=ba, BB=bb, NUM_B_TILES=triton.cdiv(db, bb))


def apply_meta(dk: int, dv: int, dtype: torch.dtype, feature_map: str) -> dict:
    """apply_kernel's constexprs; state_backward_dk_kernel and state_backward_dv_kernel take the same."""
    return dict(FM=FEATURE_MAPS.index(feature_map), DOT_PREC=_dot_precision(dtype),
                BLOCK_N=_BLOCK_N, BK=_feature_tile(dk), BV=_feature_tile(dv))


def apply_backward_dq_meta(dk: int, dv: int, dtype: torch.dtype, feature_map: str) -> dict:
    """apply_backward_dq_kernel's constexprs. A row block holds all of Dk (padded to a power of
    two); its (rows x Dk) fp32 blocks (q, phi(q), u) stay at <= 2048 elements each (tl.dot needs
    >= 16 rows), so that the 8-warp config does not spill; past Dk = 128 the Dv slices are 16
    wide for 16-bit inputs (S^T's hi + lo slices of split_dot: 32 spilled 8-16 bytes at Dk = 160)."""
    bkf = max(16, triton.next_power_of_2(dk))
    return dict(FM=FEATURE_MAPS.index(feature_map), DOT_PREC=_dot_precision(dtype),
                BLOCK_N=max(16, min(_BLOCK_N, 2048 // bkf)), BKF=bkf,
                BV=(16 if dtype != torch.float32 else 32) if bkf > 128 else _feature_tile(dv))


def _tuned(name: str, key: list[str]):
    return autotuned(getattr(kernels, name), FIXED_LAUNCH, LAUNCH_SWEEPS[name], key)


# Keyed on the head dims and the constexpr variant; Triton adds the arguments' dtypes.
_outer_sum_kernel = _tuned("outer_sum_kernel", ["DA", "DB", "FM", "HAS_Z", "HAS_W"])
_apply_kernel = _tuned("apply_kernel", ["DK", "DV", "FM"])
_apply_backward_dq_kernel = _tuned("apply_backward_dq_kernel", ["DK", "DV", "FM"])
_state_backward_dk_kernel = _tuned("state_backward_dk_kernel", ["DK", "DV", "FM"])
_state_backward_dv_kernel = _tuned("state_backward_dv_kernel", ["DK", "DV", "FM"])


# --- host helpers of the ops --------------------------------------------------------------


def _outer_sum(a: Tensor, b: Tensor, feature_map: str, z=None, w=None, divisor: int = 1):
    """(sum_i phi(a_i)^T (b_i / z_i), sum_i w_i phi(a_i)) / divisor per (B, H), fp32: one launch
    when one chunk covers N, else the chunk partials and one fixed-order reduction launch.
    z and w come together (apply_backward's dS / dm) or not at all (the state)."""
    bsz, n, h, da = a.shape
    db = b.shape[-1]
    meta = outer_sum_meta(da, db, b.dtype, feature_map, weighted=z is not None)
    tiles_a, tiles_b = triton.cdiv(da, meta["BA"]), meta["NUM_B_TILES"]
    chunk = _chunk_size(n, tiles_a * tiles_b * bsz * h, a.device)
    chunks = triton.cdiv(n, chunk)
    part = a.new_empty((chunks, bsz, h, da, db), dtype=torch.float32)
    mpart = a.new_empty((chunks, bsz, h, da), dtype=torch.float32)
    dummy = part  # never read when HAS_Z / HAS_W is False
    _outer_sum_kernel[(tiles_a * tiles_b * chunks * bsz * h,)](
        a, b, dummy if z is None else z, dummy if w is None else w, part, mpart,
        n, h, da, db, chunk, tiles_a * tiles_b, chunks, bsz * h, divisor if chunks == 1 else 1,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2), **meta,
    )
    if chunks == 1:
        return part[0], mpart[0]
    state = a.new_empty((bsz, h, da, db), dtype=torch.float32)
    mean = a.new_empty((bsz, h, da), dtype=torch.float32)
    block = _REDUCE_BLOCK
    programs = (triton.cdiv(da * db, block) + triton.cdiv(da, block)) * bsz * h
    kernels.reduce_chunks_kernel[(programs,)](part, mpart, state, mean, chunks, bsz * h, da * db, da, divisor,
                                              BLOCK=block, num_warps=4)
    return state, mean


def _state(k: Tensor, v: Tensor, feature_map: str):
    return _outer_sum(k, v, feature_map, divisor=k.shape[1])


def _apply(q: Tensor, state: Tensor, mean: Tensor, eps: float, feature_map: str) -> Tensor:
    bsz, n, h, dk = q.shape
    dv = state.shape[-1]
    meta = apply_meta(dk, dv, q.dtype, feature_map)
    out = q.new_empty((bsz, n, h, dv))
    blocks, tiles = triton.cdiv(n, _BLOCK_N), triton.cdiv(dv, meta["BV"])
    _apply_kernel[(tiles * blocks * bsz * h,)](
        q, state, mean, out,
        n, h, dk, dv, eps, tiles, blocks,
        q.stride(0), q.stride(1), q.stride(2),
        state.stride(0), state.stride(1), state.stride(2), mean.stride(0), mean.stride(1), **meta,
    )
    return out


# --- the five ops ---------------------------------------------------------------------
# torch.library.custom_op rather than torch.library.triton_op: under TRITONINTERPRET=1
# a triton_op fails torch.compile and opcheck's fake-tensor test, while custom_op +
# register_fake passes eager, torch.compile(fullgraph=True) and opcheck.  (The cost:
# Inductor treats the op as opaque instead of tracing into the kernels.)


@torch.library.custom_op("mmfast_triton::linear_attention", mutates_args=())
def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float, feature_map: str) -> Tensor:
    check_qkv(q, k, v, feature_map)
    check_runnable(OP, q, k, v)
    check_int32_extent(OP, "tokens", q.shape[1])
    q, k, v = last_dim_unit(q), last_dim_unit(k), last_dim_unit(v)
    with device_guard(q):
        state, mean = _state(k, v, feature_map)
        return _apply(q, state, mean, eps, feature_map)


@torch.library.custom_op("mmfast_triton::linear_attention_state", mutates_args=())
def linear_attention_state(k: Tensor, v: Tensor, feature_map: str) -> tuple[Tensor, Tensor]:
    check_kv(k, v, feature_map, "linear_attention_state")
    check_runnable("linear_attention_state", k, v)
    check_int32_extent("linear_attention_state", "tokens", k.shape[1])
    k, v = last_dim_unit(k), last_dim_unit(v)
    with device_guard(k):
        return _state(k, v, feature_map)


@torch.library.custom_op("mmfast_triton::linear_attention_apply", mutates_args=())
def linear_attention_apply(q: Tensor, state: Tensor, mean: Tensor, eps: float, feature_map: str) -> Tensor:
    check_apply(q, state, mean, feature_map, "linear_attention_apply")
    check_runnable("linear_attention_apply", q, state, mean)
    check_int32_extent("linear_attention_apply", "tokens", q.shape[1])
    q, state, mean = last_dim_unit(q), last_dim_unit(state), last_dim_unit(mean)
    with device_guard(q):
        return _apply(q, state, mean, eps, feature_map)


@torch.library.custom_op("mmfast_triton::linear_attention_apply_backward", mutates_args=())
def linear_attention_apply_backward(
    grad_out: Tensor, q: Tensor, state: Tensor, mean: Tensor, eps: float, feature_map: str
) -> tuple[Tensor, Tensor, Tensor]:
    bsz, n, h, dk, dv = check_apply_backward(grad_out, q, state, mean, feature_map)
    check_runnable(OP, q, grad_out, state, mean)
    check_int32_extent(OP, "tokens", q.shape[1])
    grad_out, q = last_dim_unit(grad_out.to(q.dtype)), last_dim_unit(q)
    state, mean = last_dim_unit(state), last_dim_unit(mean)
    meta = apply_backward_dq_meta(dk, dv, q.dtype, feature_map)
    with device_guard(q):
        grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
        z = q.new_empty((bsz, h, n), dtype=torch.float32)
        dz = torch.empty_like(z)
        blocks = triton.cdiv(n, meta["BLOCK_N"])
        _apply_backward_dq_kernel[(blocks * bsz * h,)](
            grad_out, q, state, mean, grad_q, z, dz,
            n, h, dk, dv, eps, blocks,
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            q.stride(0), q.stride(1), q.stride(2),
            state.stride(0), state.stride(1), state.stride(2), mean.stride(0), mean.stride(1), **meta,
        )
        # dS = sum_i phi(q_i)^T do_i / z_i, dm = sum_i dz_i phi(q_i): the state's reduction.
        grad_state, grad_mean = _outer_sum(q, grad_out, feature_map, z=z, w=dz)
    return grad_q, grad_state, grad_mean


@torch.library.custom_op("mmfast_triton::linear_attention_state_backward", mutates_args=())
def linear_attention_state_backward(
    grad_state: Tensor, grad_mean: Tensor, k: Tensor, v: Tensor, feature_map: str
) -> tuple[Tensor, Tensor]:
    bsz, n, h, dk, dv = check_state_backward(grad_state, grad_mean, k, v, feature_map)
    check_runnable(OP, k, v, grad_state, grad_mean)
    check_int32_extent(OP, "tokens", k.shape[1])
    k, v = last_dim_unit(k), last_dim_unit(v)
    grad_state = last_dim_unit(grad_state.to(torch.float32))
    grad_mean = last_dim_unit(grad_mean.to(torch.float32))
    meta = apply_meta(dk, dv, k.dtype, feature_map)
    with device_guard(k):
        grad_k = torch.empty_like(k, memory_format=torch.contiguous_format)
        grad_v = torch.empty_like(v, memory_format=torch.contiguous_format)
        rows = triton.cdiv(n, _BLOCK_N)
        tiles_k, tiles_v = triton.cdiv(dk, meta["BK"]), triton.cdiv(dv, meta["BV"])
        _state_backward_dk_kernel[(tiles_k * rows * bsz * h,)](
            k, v, grad_state, grad_mean, grad_k,
            n, h, dk, dv, 1.0 / n, tiles_k, rows,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            grad_state.stride(0), grad_state.stride(1), grad_state.stride(2),
            grad_mean.stride(0), grad_mean.stride(1), **meta,
        )
        _state_backward_dv_kernel[(tiles_v * rows * bsz * h,)](
            k, grad_state, grad_v,
            n, h, dk, dv, 1.0 / n, tiles_v, rows,
            k.stride(0), k.stride(1), k.stride(2),
            grad_state.stride(0), grad_state.stride(1), grad_state.stride(2), **meta,
        )
    return grad_k, grad_v


register_fakes_and_autograd("mmfast_triton")
