"""Triton kernels of mmfast's non-causal normalised linear attention (LinFusion).

The five ops mirror the C++ schemas in csrc/registration.cpp and live in the
namespace ``mmfast_triton``; ``OPS`` holds their handles for mmfast.ops.

Math per (b, h), phi = elu+1 | relu | identity, token tensors (B, N, H, D):
    S = (1/N) sum_j phi(k_j)^T v_j,  m = (1/N) sum_j phi(k_j)          (fp32)
    out_i = phi(q_i) S / (phi(q_i) . m + eps)
Backward (z_i = phi(q_i).m + eps, g_i = do_i / z_i, u_i = g_i S^T):
    dS = sum_i phi(q_i)^T g_i,  dz_i = -(g_i . o_i) = -(phi(q_i) . u_i) / z_i,
    dm = sum_i dz_i phi(q_i),   dq_i = (u_i + dz_i m) * phi'(q_i)
    dk_j = (v_j dS^T + dm) / N * phi'(k_j),  dv_j = phi(k_j) dS / N

Kernels (BD = feature tile = next power of two of D, clamped to [16, 64]; tl.dot
needs every block dim >= 16 and a power of two, so D = 40/80/160 run as 64 / 64+64
(second tile masked) / 64+64+64 (last tile masked) and padded lanes are never loaded):
  _outer_sum_kernel     grid (chunks of N, Dk-tiles * Dv-tiles, B*H)
                        fp32 partials of sum_i phi(a_i)^T (b_i / z_i) and
                        sum_i w_i phi(a_i) per chunk -> workspace, reduced with
                        torch.sum over the chunk axis.  Runs the state (a=k, b=v)
                        and the dS/dm of apply_backward (a=q, b=do, z, w=dz).
                        Splitting N is what keeps the GPU busy when B*H is small
                        (10-40 in SD UNets); flash_bla streams all of N per CTA.
  _apply_kernel         grid (N-blocks, Dv-tiles, B*H), loops over Dk-tiles,
                        accumulating the numerator (tl.dot) and z (fp32 sum).
  _apply_bwd_dq_kernel  grid (N-blocks of 16-64 rows, B*H); a row block holds all of
                        Dk (padded to a power of two; dz needs the full phi(q).u
                        before any dq can be written), loops over Dv-tiles for
                        u = g S^T; writes dq plus z and dz per row (8 bytes/row)
                        for the dS/dm pass, which reuses _outer_sum_kernel.
  _state_bwd_dk_kernel  grid (N-blocks, Dk-tiles, B*H), loops over Dv-tiles.
  _state_bwd_dv_kernel  grid (N-blocks, Dv-tiles, B*H), loops over Dk-tiles.

Precision: phi, z, divides and every accumulation are fp32.  S, dS and 1/z-scaled
rows are fp32, so the dots that touch them take fp32 operands: "ieee" for fp32
inputs (matches the fp32 reference tightly), "tf32" for fp16/bf16 inputs (the op
is memory bound, so tf32 instead of half MMAs costs no time, and S is never
rounded to half as flash_bla does).  The one dot with only token operands,
phi(k)^T v of the state, takes fp16/bf16 operands as they are, fp32 accumulation.

Strides: token tensors are read in place through their B/N/H strides (so a
(B, H, N, D) tensor transposed to (B, N, H, D) costs no copy); only a last-dim
stride != 1 forces .contiguous().  Every output is contiguous.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _linear_attention_meta as meta
from .. import ops as mmfast_ops

_FEATURE_MAP_IDS = {"elu1": 0, "relu": 1, "none": 2}
def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older releases read the variable
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRET = _interpreting()

# Token rows per program in the row-parallel kernels / per loop step in the chunked ones.
_BLOCK_N = 64
# Tokens per chunk of the split-N reductions on CPU (interpreter).  Small so that
# N > 256 exercises the multi-chunk reduction; the GPU picks from the SM count.
_CPU_CHUNK = 256
# Launch config of every kernel.  From an offline sm_90 compile (ptxas resource
# usage): at 4 warps the 64x64 fp32 tiles spill registers in _apply, _apply_bwd_dq
# and _state_bwd_dk; at 8 warps / 2 stages none of the shipped configs spill
# (except 48 B in the fp32 Dk > 128 dq kernel).  Not autotuned yet.
_LAUNCH = dict(num_warps=8, num_stages=2)


# --- feature map --------------------------------------------------------------------


@triton.jit
def _phi(x, FM: tl.constexpr):
    if FM == 0:  # elu + 1
        return tl.where(x > 0, x + 1.0, tl.exp(x))
    elif FM == 1:  # relu
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def _times_dphi(grad, x, FM: tl.constexpr):
    """grad * phi'(x)."""
    if FM == 0:
        return tl.where(x > 0, grad, grad * tl.exp(x))
    elif FM == 1:
        return tl.where(x > 0, grad, 0.0)
    else:
        return grad


# --- kernels --------------------------------------------------------------------------


@triton.jit
def _outer_sum_kernel(
    a_ptr, b_ptr, z_ptr, w_ptr, part_ptr, mpart_ptr,
    N, H, DA, DB, CHUNK,
    s_ab, s_an, s_ah, s_bb, s_bn, s_bh,
    FM: tl.constexpr, HAS_Z: tl.constexpr, HAS_W: tl.constexpr,
    HALF_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, NUM_B_TILES: tl.constexpr,
):
    """part[c, bh] = sum_{i in chunk c} phi(a_i)^T (b_i / z_i); mpart[c, bh] = sum_i w_i phi(a_i)."""
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_bh = tl.program_id(2)
    BH = tl.num_programs(2)
    tile_a = pid_t // NUM_B_TILES
    tile_b = pid_t % NUM_B_TILES
    b_idx = (pid_bh // H).to(tl.int64)
    h_idx = (pid_bh % H).to(tl.int64)
    a_ptr += b_idx * s_ab + h_idx * s_ah
    b_ptr += b_idx * s_bb + h_idx * s_bh

    cols_a = tile_a * BA + tl.arange(0, BA)
    cols_b = tile_b * BB + tl.arange(0, BB)
    mask_a = cols_a < DA
    mask_b = cols_b < DB

    acc = tl.zeros((BA, BB), dtype=tl.float32)
    macc = tl.zeros((BA,), dtype=tl.float32)
    start = pid_c * CHUNK
    end = tl.minimum(start + CHUNK, N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask_r = rows < end
        rows64 = rows.to(tl.int64)
        mask_ra = mask_r[:, None] & mask_a[None, :]
        a = tl.load(a_ptr + rows64[:, None] * s_an + cols_a[None, :], mask=mask_ra, other=0.0)
        # Masked lanes must be 0 after phi (elu1 maps 0 to 1).
        pa = tl.where(mask_ra, _phi(a.to(tl.float32), FM), 0.0)
        b = tl.load(b_ptr + rows64[:, None] * s_bn + cols_b[None, :],
                    mask=mask_r[:, None] & mask_b[None, :], other=0.0)
        if HAS_Z:
            # other=1 so padded rows give 0/1, not 0/0 (NaN would poison the dot).
            z = tl.load(z_ptr + pid_bh.to(tl.int64) * N + rows64, mask=mask_r, other=1.0)
            b = b.to(tl.float32) / z[:, None]
        if HALF_DOT:
            acc = tl.dot(tl.trans(pa.to(b.dtype)), b, acc)
        else:
            acc = tl.dot(tl.trans(pa), b.to(tl.float32), acc, input_precision=DOT_PREC)
        if HAS_W:
            w = tl.load(w_ptr + pid_bh.to(tl.int64) * N + rows64, mask=mask_r, other=0.0)
            macc += tl.sum(pa * w[:, None], axis=0)
        else:
            macc += tl.sum(pa, axis=0)

    slot = (pid_c * BH + pid_bh).to(tl.int64)
    part_ptrs = part_ptr + (slot * DA + cols_a[:, None]) * DB + cols_b[None, :]
    tl.store(part_ptrs, acc, mask=mask_a[:, None] & mask_b[None, :])
    # Every Dv-tile computes the same m partial; only the first stores it.
    tl.store(mpart_ptr + slot * DA + cols_a, macc, mask=mask_a & (tile_b == 0))


@triton.jit
def _apply_kernel(
    q_ptr, s_ptr, m_ptr, o_ptr,
    N, H, DK, DV, eps,
    s_qb, s_qn, s_qh, s_sb, s_sh, s_sk, s_mb, s_mh,
    FM: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b_idx = (pid_bh // H).to(tl.int64)
    h_idx = (pid_bh % H).to(tl.int64)
    q_ptr += b_idx * s_qb + h_idx * s_qh
    s_ptr += b_idx * s_sb + h_idx * s_sh
    m_ptr += b_idx * s_mb + h_idx * s_mh

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < N
    rows64 = rows.to(tl.int64)
    cols_v = pid_v * BV + tl.arange(0, BV)
    mask_v = cols_v < DV

    acc = tl.zeros((BLOCK_N, BV), dtype=tl.float32)
    z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, DK, BK):
        cols_k = k0 + tl.arange(0, BK)
        mask_k = cols_k < DK
        mask_rk = mask_r[:, None] & mask_k[None, :]
        q = tl.load(q_ptr + rows64[:, None] * s_qn + cols_k[None, :], mask=mask_rk, other=0.0)
        pq = tl.where(mask_rk, _phi(q.to(tl.float32), FM), 0.0)
        s = tl.load(s_ptr + cols_k[:, None] * s_sk + cols_v[None, :],
                    mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        m = tl.load(m_ptr + cols_k, mask=mask_k, other=0.0)
        acc = tl.dot(pq, s, acc, input_precision=DOT_PREC)
        z += tl.sum(pq * m[None, :], axis=1)
    out = acc / (z + eps)[:, None]
    o_ptrs = o_ptr + ((b_idx * N + rows64[:, None]) * H + h_idx) * DV + cols_v[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_v[None, :])


@triton.jit
def _apply_bwd_dq_kernel(
    do_ptr, q_ptr, s_ptr, m_ptr, dq_ptr, z_ptr, dz_ptr,
    N, H, DK, DV, eps,
    s_db, s_dn, s_dh, s_qb, s_qn, s_qh, s_sb, s_sh, s_sk, s_mb, s_mh,
    FM: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
):
    """dq for a block of rows, plus z_i and dz_i for the dS/dm pass."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b_idx = (pid_bh // H).to(tl.int64)
    h_idx = (pid_bh % H).to(tl.int64)
    do_ptr += b_idx * s_db + h_idx * s_dh
    q_ptr += b_idx * s_qb + h_idx * s_qh
    s_ptr += b_idx * s_sb + h_idx * s_sh
    m_ptr += b_idx * s_mb + h_idx * s_mh

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < N
    rows64 = rows.to(tl.int64)
    cols_k = tl.arange(0, BKF)
    mask_k = cols_k < DK
    mask_rk = mask_r[:, None] & mask_k[None, :]

    q = tl.load(q_ptr + rows64[:, None] * s_qn + cols_k[None, :], mask=mask_rk, other=0.0).to(tl.float32)
    pq = tl.where(mask_rk, _phi(q, FM), 0.0)
    m = tl.load(m_ptr + cols_k, mask=mask_k, other=0.0)
    z = tl.sum(pq * m[None, :], axis=1) + eps

    u = tl.zeros((BLOCK_N, BKF), dtype=tl.float32)  # u = g S^T, g = do / z
    for v0 in range(0, DV, BV):
        cols_v = v0 + tl.arange(0, BV)
        mask_v = cols_v < DV
        do = tl.load(do_ptr + rows64[:, None] * s_dn + cols_v[None, :],
                     mask=mask_r[:, None] & mask_v[None, :], other=0.0)
        g = do.to(tl.float32) / z[:, None]
        s_t = tl.load(s_ptr + cols_k[None, :] * s_sk + cols_v[:, None],
                      mask=mask_k[None, :] & mask_v[:, None], other=0.0)  # (BV, BKF) = S^T tile
        u = tl.dot(g, s_t, u, input_precision=DOT_PREC)
    # g.o = phi(q) S g^T / z = phi(q).u / z: no need to recompute o.
    dz = -tl.sum(pq * u, axis=1) / z
    dq = _times_dphi(u + dz[:, None] * m[None, :], q, FM)
    dq_ptrs = dq_ptr + ((b_idx * N + rows64[:, None]) * H + h_idx) * DK + cols_k[None, :]
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=mask_rk)
    row_ptrs = pid_bh.to(tl.int64) * N + rows64
    tl.store(z_ptr + row_ptrs, z, mask=mask_r)
    tl.store(dz_ptr + row_ptrs, dz, mask=mask_r)


@triton.jit
def _state_bwd_dk_kernel(
    k_ptr, v_ptr, ds_ptr, dm_ptr, dk_ptr,
    N, H, DK, DV, inv_n,
    s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_sb, s_sh, s_sk, s_mb, s_mh,
    FM: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """dk_j = (v_j dS^T + dm) / N * phi'(k_j)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b_idx = (pid_bh // H).to(tl.int64)
    h_idx = (pid_bh % H).to(tl.int64)
    k_ptr += b_idx * s_kb + h_idx * s_kh
    v_ptr += b_idx * s_vb + h_idx * s_vh
    ds_ptr += b_idx * s_sb + h_idx * s_sh
    dm_ptr += b_idx * s_mb + h_idx * s_mh

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < N
    rows64 = rows.to(tl.int64)
    cols_k = pid_k * BK + tl.arange(0, BK)
    mask_k = cols_k < DK

    acc = tl.zeros((BLOCK_N, BK), dtype=tl.float32)
    for v0 in range(0, DV, BV):
        cols_v = v0 + tl.arange(0, BV)
        mask_v = cols_v < DV
        v = tl.load(v_ptr + rows64[:, None] * s_vn + cols_v[None, :],
                    mask=mask_r[:, None] & mask_v[None, :], other=0.0)
        ds_t = tl.load(ds_ptr + cols_k[None, :] * s_sk + cols_v[:, None],
                       mask=mask_k[None, :] & mask_v[:, None], other=0.0)  # (BV, BK) = dS^T tile
        acc = tl.dot(v.to(tl.float32), ds_t, acc, input_precision=DOT_PREC)
    dm = tl.load(dm_ptr + cols_k, mask=mask_k, other=0.0)
    mask_rk = mask_r[:, None] & mask_k[None, :]
    k = tl.load(k_ptr + rows64[:, None] * s_kn + cols_k[None, :], mask=mask_rk, other=0.0).to(tl.float32)
    dk = _times_dphi((acc + dm[None, :]) * inv_n, k, FM)
    dk_ptrs = dk_ptr + ((b_idx * N + rows64[:, None]) * H + h_idx) * DK + cols_k[None, :]
    tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=mask_rk)


@triton.jit
def _state_bwd_dv_kernel(
    k_ptr, ds_ptr, dv_ptr,
    N, H, DK, DV, inv_n,
    s_kb, s_kn, s_kh, s_sb, s_sh, s_sk,
    FM: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """dv_j = phi(k_j) dS / N."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b_idx = (pid_bh // H).to(tl.int64)
    h_idx = (pid_bh % H).to(tl.int64)
    k_ptr += b_idx * s_kb + h_idx * s_kh
    ds_ptr += b_idx * s_sb + h_idx * s_sh

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < N
    rows64 = rows.to(tl.int64)
    cols_v = pid_v * BV + tl.arange(0, BV)
    mask_v = cols_v < DV

    acc = tl.zeros((BLOCK_N, BV), dtype=tl.float32)
    for k0 in range(0, DK, BK):
        cols_k = k0 + tl.arange(0, BK)
        mask_k = cols_k < DK
        mask_rk = mask_r[:, None] & mask_k[None, :]
        k = tl.load(k_ptr + rows64[:, None] * s_kn + cols_k[None, :], mask=mask_rk, other=0.0)
        pk = tl.where(mask_rk, _phi(k.to(tl.float32), FM), 0.0)
        ds = tl.load(ds_ptr + cols_k[:, None] * s_sk + cols_v[None, :],
                     mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        acc = tl.dot(pk, ds, acc, input_precision=DOT_PREC)
    dv_ptrs = dv_ptr + ((b_idx * N + rows64[:, None]) * H + h_idx) * DV + cols_v[None, :]
    tl.store(dv_ptrs, (acc * inv_n).to(dv_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_v[None, :])


# --- host helpers ---------------------------------------------------------------------


def _feature_tile(d: int) -> int:
    return min(max(16, triton.next_power_of_2(d)), 64)


def _last_dim_unit(t: Tensor) -> Tensor:
    # Kernels index the last dim with stride 1 and every other dim through its stride.
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _half_dot(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot runs np.matmul on bf16's raw uint16 bits (garbage), so
    # under TRITON_INTERPRET=1 bf16 operands go in as fp32 instead.
    if dtype == torch.float16:
        return True
    return dtype == torch.bfloat16 and not _INTERPRET


def _check_runnable(*tensors: Tensor) -> None:
    for t in tensors:
        if t.dtype == torch.float64:
            raise TypeError(
                "linear_attention: the triton backend has no float64 kernels; use backend='native' "
                "(or backend='reference') for float64 inputs"
            )
    device = tensors[0].device
    if device.type != "cuda" and not (_INTERPRET and device.type == "cpu"):
        raise TypeError(
            f"linear_attention: the triton backend runs on CUDA tensors (CPU tensors only under "
            f"TRITON_INTERPRET=1, set before triton is imported), got {device.type} tensors"
        )


def _device_guard(t: Tensor):
    # Triton launches on the current CUDA device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


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
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        chunks = max(1, triton.cdiv(4 * sms, programs_per_chunk))
        chunk = max(4 * _BLOCK_N, triton.cdiv(n, chunks))
    return triton.cdiv(chunk, _BLOCK_N) * _BLOCK_N


def _outer_sum(a: Tensor, b: Tensor, feature_map: str, z=None, w=None):
    """(sum_i phi(a_i)^T (b_i / z_i), sum_i w_i phi(a_i)) per (B, H), fp32, unscaled."""
    bsz, n, h, da = a.shape
    db = b.shape[-1]
    ba, bb = _feature_tile(da), _feature_tile(db)
    tiles_a, tiles_b = triton.cdiv(da, ba), triton.cdiv(db, bb)
    chunk = _chunk_size(n, tiles_a * tiles_b * bsz * h, a.device)
    chunks = triton.cdiv(n, chunk)
    part = a.new_empty((chunks, bsz, h, da, db), dtype=torch.float32)
    mpart = a.new_empty((chunks, bsz, h, da), dtype=torch.float32)
    dummy = part  # never read when HAS_Z / HAS_W is False
    _outer_sum_kernel[(chunks, tiles_a * tiles_b, bsz * h)](
        a, b, dummy if z is None else z, dummy if w is None else w, part, mpart,
        n, h, da, db, chunk,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        FM=_FEATURE_MAP_IDS[feature_map], HAS_Z=z is not None, HAS_W=w is not None,
        HALF_DOT=z is None and _half_dot(b.dtype), DOT_PREC=_dot_precision(a.dtype),
        BLOCK_N=_BLOCK_N, BA=ba, BB=bb, NUM_B_TILES=tiles_b, **_LAUNCH,
    )
    if chunks == 1:
        return part[0], mpart[0]
    return part.sum(0), mpart.sum(0)


def _state(k: Tensor, v: Tensor, feature_map: str):
    n = k.shape[1]
    state, mean = _outer_sum(k, v, feature_map)
    return state.div_(n), mean.div_(n)


def _apply(q: Tensor, state: Tensor, mean: Tensor, eps: float, feature_map: str) -> Tensor:
    bsz, n, h, dk = q.shape
    dv = state.shape[-1]
    bk, bv = _feature_tile(dk), _feature_tile(dv)
    out = q.new_empty((bsz, n, h, dv))
    _apply_kernel[(triton.cdiv(n, _BLOCK_N), triton.cdiv(dv, bv), bsz * h)](
        q, state, mean, out,
        n, h, dk, dv, eps,
        q.stride(0), q.stride(1), q.stride(2),
        state.stride(0), state.stride(1), state.stride(2), mean.stride(0), mean.stride(1),
        FM=_FEATURE_MAP_IDS[feature_map], DOT_PREC=_dot_precision(q.dtype),
        BLOCK_N=_BLOCK_N, BK=bk, BV=bv, **_LAUNCH,
    )
    return out


# --- the five ops ---------------------------------------------------------------------
# torch.library.custom_op rather than torch.library.triton_op: under TRITON_INTERPRET=1
# a triton_op fails torch.compile and opcheck's fake-tensor test, while custom_op +
# register_fake passes eager, torch.compile(fullgraph=True) and opcheck.  (The cost:
# Inductor treats the op as opaque instead of tracing into the kernels.)


@torch.library.custom_op("mmfast_triton::linear_attention", mutates_args=())
def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float, feature_map: str) -> Tensor:
    meta.check_qkv(q, k, v, feature_map)
    _check_runnable(q, k, v)
    q, k, v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
    with _device_guard(q):
        state, mean = _state(k, v, feature_map)
        return _apply(q, state, mean, eps, feature_map)


@torch.library.custom_op("mmfast_triton::linear_attention_state", mutates_args=())
def linear_attention_state(k: Tensor, v: Tensor, feature_map: str) -> tuple[Tensor, Tensor]:
    meta.check_kv(k, v, feature_map)
    _check_runnable(k, v)
    k, v = _last_dim_unit(k), _last_dim_unit(v)
    with _device_guard(k):
        return _state(k, v, feature_map)


@torch.library.custom_op("mmfast_triton::linear_attention_apply", mutates_args=())
def linear_attention_apply(q: Tensor, state: Tensor, mean: Tensor, eps: float, feature_map: str) -> Tensor:
    meta.check_apply(q, state, mean, feature_map)
    _check_runnable(q, state, mean)
    q, state, mean = _last_dim_unit(q), _last_dim_unit(state), _last_dim_unit(mean)
    with _device_guard(q):
        return _apply(q, state, mean, eps, feature_map)


@torch.library.custom_op("mmfast_triton::linear_attention_apply_backward", mutates_args=())
def linear_attention_apply_backward(
    grad_out: Tensor, q: Tensor, state: Tensor, mean: Tensor, eps: float, feature_map: str
) -> tuple[Tensor, Tensor, Tensor]:
    bsz, n, h, dk, dv = meta.check_apply(q, state, mean, feature_map)
    if tuple(grad_out.shape) != (bsz, n, h, dv):
        raise ValueError(
            f"linear_attention: grad_out must be (B, N, H, Dv) = {(bsz, n, h, dv)}, got {tuple(grad_out.shape)}"
        )
    _check_runnable(q, grad_out, state, mean)
    grad_out, q = _last_dim_unit(grad_out.to(q.dtype)), _last_dim_unit(q)
    state, mean = _last_dim_unit(state), _last_dim_unit(mean)
    bkf = max(16, triton.next_power_of_2(dk))
    # Keep the (rows x Dk) fp32 blocks (q, phi(q), u) at <= 2048 elements each
    # (tl.dot needs >= 16 rows): no register spills at 8 warps.
    block_n = max(16, min(_BLOCK_N, 2048 // bkf))
    bv = 32 if bkf > 128 else _feature_tile(dv)
    with _device_guard(q):
        grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
        z = q.new_empty((bsz, h, n), dtype=torch.float32)
        dz = torch.empty_like(z)
        _apply_bwd_dq_kernel[(triton.cdiv(n, block_n), bsz * h)](
            grad_out, q, state, mean, grad_q, z, dz,
            n, h, dk, dv, eps,
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            q.stride(0), q.stride(1), q.stride(2),
            state.stride(0), state.stride(1), state.stride(2), mean.stride(0), mean.stride(1),
            FM=_FEATURE_MAP_IDS[feature_map], DOT_PREC=_dot_precision(q.dtype),
            BLOCK_N=block_n, BKF=bkf, BV=bv, **_LAUNCH,
        )
        # dS = sum_i phi(q_i)^T do_i / z_i, dm = sum_i dz_i phi(q_i): the state's reduction.
        grad_state, grad_mean = _outer_sum(q, grad_out, feature_map, z=z, w=dz)
    return grad_q, grad_state, grad_mean


@torch.library.custom_op("mmfast_triton::linear_attention_state_backward", mutates_args=())
def linear_attention_state_backward(
    grad_state: Tensor, grad_mean: Tensor, k: Tensor, v: Tensor, feature_map: str
) -> tuple[Tensor, Tensor]:
    bsz, n, h, dk, dv = meta.check_kv(k, v, feature_map)
    if tuple(grad_state.shape) != (bsz, h, dk, dv) or tuple(grad_mean.shape) != (bsz, h, dk):
        raise ValueError(
            f"linear_attention: grad_state must be {(bsz, h, dk, dv)} and grad_mean {(bsz, h, dk)}, got "
            f"{tuple(grad_state.shape)} and {tuple(grad_mean.shape)}"
        )
    _check_runnable(k, v, grad_state, grad_mean)
    k, v = _last_dim_unit(k), _last_dim_unit(v)
    grad_state = _last_dim_unit(grad_state.to(torch.float32))
    grad_mean = _last_dim_unit(grad_mean.to(torch.float32))
    bk, bv = _feature_tile(dk), _feature_tile(dv)
    fm, prec = _FEATURE_MAP_IDS[feature_map], _dot_precision(k.dtype)
    with _device_guard(k):
        grad_k = torch.empty_like(k, memory_format=torch.contiguous_format)
        grad_v = torch.empty_like(v, memory_format=torch.contiguous_format)
        rows = triton.cdiv(n, _BLOCK_N)
        _state_bwd_dk_kernel[(rows, triton.cdiv(dk, bk), bsz * h)](
            k, v, grad_state, grad_mean, grad_k,
            n, h, dk, dv, 1.0 / n,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            grad_state.stride(0), grad_state.stride(1), grad_state.stride(2),
            grad_mean.stride(0), grad_mean.stride(1),
            FM=fm, DOT_PREC=prec, BLOCK_N=_BLOCK_N, BK=bk, BV=bv, **_LAUNCH,
        )
        _state_bwd_dv_kernel[(rows, triton.cdiv(dv, bv), bsz * h)](
            k, grad_state, grad_v,
            n, h, dk, dv, 1.0 / n,
            k.stride(0), k.stride(1), k.stride(2),
            grad_state.stride(0), grad_state.stride(1), grad_state.stride(2),
            FM=fm, DOT_PREC=prec, BLOCK_N=_BLOCK_N, BK=bk, BV=bv, **_LAUNCH,
        )
    return grad_k, grad_v


mmfast_ops.register_linear_attention_fakes("mmfast_triton")

_ns = torch.ops.mmfast_triton
OPS = mmfast_ops.LinearAttentionOps(
    _ns.linear_attention.default,
    _ns.linear_attention_state.default,
    _ns.linear_attention_apply.default,
    _ns.linear_attention_apply_backward.default,
    _ns.linear_attention_state_backward.default,
)
mmfast_ops.register_linear_attention_autograd("mmfast_triton", OPS)
