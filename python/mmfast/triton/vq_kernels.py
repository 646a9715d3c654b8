"""Triton kernels of the VQ family; python/mmfast/triton/vq.py launches them.

  search_kernel  1-D grid over (row tile, code split): for every BLOCK_K-code tile of the split,
                 the dots of BLOCK_N rows of z with the codes (tl.dot over BLOCK_D slices of D,
                 fp32 accumulation: "ieee" for fp32 inputs; fp16 / bf16 operands as they are
                 (HALF: 16-bit MMAs, products exact, twice the rate of tf32 on fp32 copies), or
                 converted to fp32 for "ieee" where the interpreter cannot multiply bf16 (UPCAST:
                 the same exact products)), scores sqnorm_c - 2 z . e_c,
                 and per row the best score and code (NaN scores count as +inf; tl.argmin
                 breaks ties to the left, and a tile replaces the running best only when
                 strictly smaller, so ties keep the lowest code). Writes the split's partial.
  lookup_kernel  one program per BLOCK elements of the output: the codebook rows of the
                 indices (rows or channels-first), copied as raw bits; NaN for an index
                 outside [0, K).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import to_fp32


@triton.jit
def search_kernel(
    z_ptr, c_ptr, sq_ptr, best_ptr, code_ptr,
    N, K, D, s_zn, SPLITS, CODE_TILES,
    N_BUCKET,  # N rounded up to a power of two: the autotune key only, never read here
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    split = pid % SPLITS
    rows = (pid // SPLITS) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < N
    rows64 = rows.to(tl.int64)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    code = tl.full((BLOCK_N,), 0, tl.int64) + K  # K: no finite score yet
    # int64: CODE_TILES * SPLITS passes 2^31 from about 2.6e8 codes at 528 splits (an int32
    # product wrapped to negative tiles, read before the codebook)
    t0 = tl.cast(CODE_TILES, tl.int64) * split // SPLITS
    t1 = tl.cast(CODE_TILES, tl.int64) * (split + 1) // SPLITS
    for t in range(t0, t1):
        codes = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_c = codes < K
        codes64 = codes.to(tl.int64)
        dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask_d = cols < D
            zt = tl.load(z_ptr + rows64[:, None] * s_zn + cols[None, :], mask=mask_r[:, None] & mask_d[None, :],
                         other=0.0)
            ct = tl.load(c_ptr + codes64[:, None] * D + cols[None, :], mask=mask_c[:, None] & mask_d[None, :],
                         other=0.0)
            if HALF:
                dots = tl.dot(zt, tl.trans(ct), dots)
            else:
                dots = tl.dot(to_fp32(zt), tl.trans(to_fp32(ct)), dots, input_precision="ieee")
        sq = tl.load(sq_ptr + codes64, mask=mask_c, other=float("inf"))
        score = sq[None, :] - 2.0 * dots
        score = tl.where(mask_c[None, :] & (score == score), score, float("inf"))  # NaN never wins
        tile_best = tl.min(score, axis=1)
        tile_code = tl.argmin(score, axis=1, tie_break_left=True).to(tl.int64) + t * BLOCK_K
        take = tile_best < best
        best = tl.where(take, tile_best, best)
        code = tl.where(take, tile_code, code)
    slot = split.to(tl.int64) * N + rows64
    tl.store(best_ptr + slot, best, mask=mask_r)
    tl.store(code_ptr + slot, code, mask=mask_r)


@triton.jit
def lookup_kernel(idx_ptr, c_ptr, out_ptr, NUMEL, K, D, PLANE, D_PLANE, NAN_BITS, CHANNELS_FIRST: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Copies the codebook's raw bits (an integer view of it): one kernel for every dtype.
    NUMEL = count * D and D_PLANE = D * PLANE come from the host: an int argument of 2^31 or
    more arrives as int64, where the same product of two int32 arguments would wrap here."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < NUMEL
    if CHANNELS_FIRST:  # out[b][d][q], index i = b * P + q
        b = e // D_PLANE
        rest = e - b * D_PLANE
        d = rest // PLANE
        i = b * PLANE + (rest - d * PLANE)
    else:
        i = e // D
        d = e - i * D
    c = tl.load(idx_ptr + i, mask=mask, other=0).to(tl.int64)
    valid = (c >= 0) & (c < K)
    x = tl.load(c_ptr + c * D + d, mask=mask & valid, other=0)
    x = tl.where(valid, x, NAN_BITS.to(x.dtype))
    tl.store(out_ptr + e, x, mask=mask)
