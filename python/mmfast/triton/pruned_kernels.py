"""Triton kernels of the masked-channel (pruned-expert) family; python/mmfast/triton/pruned.py
launches them. The rules are mmfast/pruned.h's (python/mmfast/reference/pruned.py states them in
PyTorch).

Routing tables (built by the launcher with torch ops, no host synchronisation): per code c a row
of a (K, C) int32 matrix that lists the channels c keeps first, in ascending order, then the
ones it masks (a stable argsort of ~mask), and the (K,) int32 counts of kept channels.

  conv_kernel        implicit-GEMM convolution for a whole mixed-code batch, one launch. 1-D
                     grid over (sample b, tile of BLOCK_P output pixels, tile of BLOCK_O
                     positions in the code's output-channel list), the channel tile fastest
                     (the programs of one pixel tile share its x reads in L2). A program whose
                     positions hold kept outputs reduces over the code's kept inputs (BLOCK_I
                     at a time, gathered through the kept list) x the kh x kw taps: tl.dot of
                     the (pixels, inputs) x tile, read through x's four strides with zero
                     padding, and the (inputs, outputs) tile of the code's weights, accumulated
                     in fp32 (fp16 / bf16 MMAs: exact products; "tf32x3" for fp32; bf16
                     upcast to fp32 under the interpreter, whose tl.dot cannot multiply bf16),
                     plus the code's bias. Positions past the kept count are the masked
                     channels: written 0, so every output element is written exactly once
                     (the output needs no zero fill). Masked inputs, masked outputs' weights
                     and biases are never loaded. A sample whose code is outside [0, K) reads
                     nothing and writes NaN over its whole output. masked_linear runs the same
                     kernel as a 1x1 conv over the (B, Cin, N, 1) strided view of x, writing
                     y (B, N, Cout) through y's strides.
  group_norm_kernel  one program per (sample b, group g), streaming the group's C / G x P
                     elements in BLOCK chunks: pass 1 both statistics of the kept elements in
                     one read (per lane a running count, mean and sum of squared deviations,
                     Welford's update; the lanes merged pairwise, Chan et al., by tl.reduce:
                     no E[x^2] - mean^2 cancellation, fp32), pass 2 normalise, the code's affine
                     (or the shared one), SiLU when asked, and the store (masked channels 0,
                     never loaded). An invalid code writes NaN over the sample's group.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import output_value, to_fp32


@triton.jit
def conv_kernel(
    x_ptr, w_ptr, bias_ptr, codes_ptr, in_list_ptr, in_count_ptr, out_list_ptr, out_count_ptr, y_ptr,
    K, CIN, COUT, H, W, HO, WO, KH, KW, SH, SW, PH, PW, DH, DW,
    s_x0, s_x1, s_x2, s_x3, s_y0, s_y1, s_yp, W_CODE_STRIDE, BIAS_CODE_STRIDE, PIX_TILES, OUT_TILES,
    PIXELS_BUCKET,  # HO * WO rounded up to a power of two: the autotune key only, never read here
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    pid = tl.program_id(0)
    out_tile = pid % OUT_TILES
    rest = pid // OUT_TILES
    pix_tile = rest % PIX_TILES
    b = (rest // PIX_TILES).to(tl.int64)

    code = tl.load(codes_ptr + b).to(tl.int64)
    valid = (code >= 0) & (code < K)
    c = tl.where(valid, code, 0)
    kept_out = tl.where(valid, tl.load(out_count_ptr + c), 0)  # 0: an invalid code computes nothing
    kept_in = tl.load(in_count_ptr + c)

    pos = out_tile * BLOCK_O + tl.arange(0, BLOCK_O)  # positions in the code's output-channel list
    in_range_o = pos < COUT
    o = tl.load(out_list_ptr + c * COUT + pos, mask=in_range_o, other=0).to(tl.int64)
    keep_o = pos < kept_out

    pix = pix_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range_p = pix < HO * WO
    ho = pix // WO
    wo = pix % WO

    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    if out_tile * BLOCK_O < kept_out:
        x_sample = x_ptr + b * s_x0
        taps = KH * KW
        w_rows = w_ptr + c * W_CODE_STRIDE + o * (CIN * taps)  # (BLOCK_O,) the outputs' weight rows
        for i0 in range(0, kept_in, BLOCK_I):
            j = i0 + tl.arange(0, BLOCK_I)
            keep_i = j < kept_in
            i = tl.load(in_list_ptr + c * CIN + j, mask=keep_i, other=0).to(tl.int64)
            x_chan = x_sample + i * s_x1  # (BLOCK_I,)
            w_tile = w_rows[None, :] + i[:, None] * taps  # (BLOCK_I, BLOCK_O)
            w_mask = keep_i[:, None] & keep_o[None, :]
            for r in range(0, KH):
                hi = ho * SH - PH + r * DH
                in_h = in_range_p & (hi >= 0) & (hi < H)
                for s in range(0, KW):
                    wi = wo * SW - PW + s * DW
                    inside = in_h & (wi >= 0) & (wi < W)
                    x_off = hi.to(tl.int64) * s_x2 + wi.to(tl.int64) * s_x3
                    xt = tl.load(x_chan[None, :] + x_off[:, None], mask=inside[:, None] & keep_i[None, :], other=0.0)
                    wt = tl.load(w_tile + (r * KW + s), mask=w_mask, other=0.0)
                    if UPCAST:
                        acc = tl.dot(to_fp32(xt), to_fp32(wt), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(xt, wt, acc, input_precision=DOT_PREC)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c * BIAS_CODE_STRIDE + o, mask=keep_o, other=0.0)
            acc += to_fp32(bias)[None, :]
        acc = tl.where(keep_o[None, :], acc, 0.0)
    acc = tl.where(valid, acc, float("nan"))
    y_off = b * s_y0 + o[None, :] * s_y1 + pix.to(tl.int64)[:, None] * s_yp
    tl.store(y_ptr + y_off, output_value(acc, y_ptr), mask=in_range_p[:, None] & in_range_o[None, :])


@triton.jit
def load_kept(x_group, mask_row, e, n, P):
    """(keep, x as fp32) at element offsets e of a group of n = channels x P elements: keep is
    False past the group and in masked channels, which are never read (x is 0 there)."""
    inside = e < n
    keep = inside & (tl.load(mask_row + e // P, mask=inside, other=0) != 0)
    return keep, to_fp32(tl.load(x_group + e, mask=keep, other=0.0))


@triton.jit
def welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """The statistics of two disjoint sets, each (mean, sum of squared deviations, count)."""
    n = n_a + n_b
    share = tl.where(n_a == 0, 1.0, tl.math.div_rn(n_b, tl.maximum(n, 1.0)))  # exactly 1 when a is empty: b as is
    share = tl.where(n_b == 0, 0.0, share)
    delta = mean_b - mean_a
    return mean_a + delta * share, m2_a + m2_b + delta * delta * n_a * share, n


@triton.jit
def group_norm_kernel(
    x_ptr, w_ptr, bias_ptr, codes_ptr, mask_ptr, y_ptr,
    K, C, G, P, GROUP_NUMEL, AFFINE_CODE_STRIDE, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid % G
    b = (pid // G).to(tl.int64)
    code = tl.load(codes_ptr + b).to(tl.int64)
    valid = (code >= 0) & (code < K)
    c = tl.where(valid, code, 0)
    group_channels = C // G
    # (C / G) * P from the host, int64 here: an int32 argument's loops below would step past 2^31 - 1
    # and wrap within the last BLOCK below it (tl.cast, not .to: a value of 1 arrives as a constexpr)
    n = tl.cast(GROUP_NUMEL, tl.int64)
    first = g * group_channels  # the group's first channel
    base = (b * C + first) * P  # x and y are (B, C, P), contiguous
    mask_row = mask_ptr + c * C + first
    offsets = tl.arange(0, BLOCK)
    if valid:
        lane_mean = tl.zeros((BLOCK,), dtype=tl.float32)
        lane_m2 = tl.zeros((BLOCK,), dtype=tl.float32)
        lane_n = tl.zeros((BLOCK,), dtype=tl.float32)
        for e0 in range(0, n, BLOCK):
            e = e0 + offsets
            keep, xv = load_kept(x_ptr + base, mask_row, e, n, P)
            lane_n += keep.to(tl.float32)
            delta = xv - lane_mean
            lane_mean = tl.where(keep, lane_mean + tl.math.div_rn(delta, tl.maximum(lane_n, 1.0)), lane_mean)
            lane_m2 = tl.where(keep, lane_m2 + delta * (xv - lane_mean), lane_m2)
        mean, m2, kept = tl.reduce((lane_mean, lane_m2, lane_n), 0, welford_combine)
        # The statistics' divisions correctly rounded, as the interpreter's (a GPU's fp32 '/' is
        # approximate); the SiLU's exp and divide stay the GPU's approximate ones.
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(m2, tl.maximum(kept, 1.0)) + eps))
        for e0 in range(0, n, BLOCK):
            e = e0 + offsets
            channel = e // P
            keep, xv = load_kept(x_ptr + base, mask_row, e, n, P)
            yv = (xv - mean) * rstd
            if HAS_WEIGHT:
                yv *= to_fp32(tl.load(w_ptr + c * AFFINE_CODE_STRIDE + first + channel, mask=keep, other=1.0))
            if HAS_BIAS:
                yv += to_fp32(tl.load(bias_ptr + c * AFFINE_CODE_STRIDE + first + channel, mask=keep, other=0.0))
            yv = tl.where(keep, yv, 0.0)  # before SiLU: no exp of the masked lanes' garbage
            if SILU:
                yv = yv / (1.0 + tl.exp(-yv))
            tl.store(y_ptr + base + e, output_value(yv, y_ptr), mask=e < n)
    else:
        nan = output_value(tl.full((BLOCK,), float("nan"), tl.float32), y_ptr)
        for e0 in range(0, n, BLOCK):
            e = e0 + offsets
            tl.store(y_ptr + base + e, nan, mask=e < n)
