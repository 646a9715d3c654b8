"""Triton kernels of the decode family; python/mmfast/triton/decode.py launches them. The rules
are mmfast/decode.h's (python/mmfast/reference/decode.py states them in PyTorch).

  append_kernel     1-D grid over (row b, tile of BLOCK_R (token, kv head) pairs, tile of
                    BLOCK_D channels): copies the raw bits (an integer view: one kernel for every
                    dtype) of k and v to slots [len_b, len_b + S) of the caches. A row whose slots
                    fall outside [0, T_max) writes nothing (no host synchronisation).
  attention_kernel  flash-decoding. 1-D grid over (split, row tile, kv head, row b). The rows of
                    a program's tile are the G = H / H_kv query heads of one KV head times the Sq
                    queries (row m = i * G + g), so the group shares every K / V load and one
                    tl.dot computes all their scores. The keys a row can see, [lo, len) with lo
                    the window's start for the first query, are cut into BLOCK_N tiles and the
                    tiles shared out evenly among the splits. Online softmax in fp32: scores
                    scale * q.k (fp16 / bf16 MMAs with fp32 accumulation: exact products;
                    "tf32x3" for fp32), soft-capped, masked (causal, window), then P V, P split
                    into its value in v's dtype and the remainder (two fp16 / bf16 MMAs, P to
                    about 16 significant bits; "tf32x3" for fp32). With one split the program normalises
                    and writes the output; otherwise it writes O / l and m + log l (fp32) to the
                    workspace. A row whose length is outside [Sq, T_max] reads nothing and
                    writes NaN.
  combine_kernel    1-D grid over tiles of BLOCK_R output rows (b, i, h): the splits' partials in
                    split order, weighted by exp(lse_s - max lse), into the output dtype.
  sample_kernel     one program per sampled row, streaming the vocabulary in BLOCK_V chunks
                    (the CFG mix and the temperature recomputed on every pass):
                      1. validity (NaN, +inf, all -inf), argmax (lowest index), max of x / T;
                      2. top-k: the k-th largest value as a radix search (4 bits per pass, 8
                         passes) over order-preserving int keys of the fp32 bits: the largest
                         key t with count(key >= t) >= k;
                      3. top-p: the total mass W of the kept tokens (weights exp(x - max)), then
                         the same radix search weighted by mass: the largest key t with
                         mass(key >= t) >= top_p * W (the smallest value whose strictly larger
                         values weigh < top_p * W: the threshold-crossing token and its ties
                         kept), capped at the max's key (top_p = 0 keeps the max's ties);
                      4. the kept mass S, then the inverse-CDF draw in index order: the smallest
                         index whose running sum (tl.cumsum, carried across chunks) exceeds
                         u * S, else the last kept index (never out of range).
                    No sort. An invalid row gets status 1 and token 0.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import output_value, to_fp32


# --- kv_cache_append --------------------------------------------------------------------


@triton.jit
def append_kernel(
    kc_ptr, vc_ptr, k_ptr, v_ptr, lens_ptr,
    S, KVH, D, T_MAX, ROW_TILES, D_TILES,
    s_kcb, s_kct, s_kch, s_vcb, s_vct, s_vch,
    s_kb, s_ks, s_kh, s_kd, s_vb, s_vs, s_vh, s_vd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    d_tile = pid % D_TILES
    r_tile = (pid // D_TILES) % ROW_TILES
    b = (pid // (D_TILES * ROW_TILES)).to(tl.int64)
    length = tl.load(lens_ptr + b).to(tl.int64)
    fits = (length >= 0) & (length + S <= T_MAX)
    r = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    s = (r // KVH).to(tl.int64)
    h = (r % KVH).to(tl.int64)
    mask_r = (r < S * KVH) & fits
    d = (d_tile * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask = mask_r[:, None] & (d < D)[None, :]
    slot = length + s
    kx = tl.load(k_ptr + (b * s_kb + s * s_ks + h * s_kh)[:, None] + d[None, :] * s_kd, mask=mask)
    tl.store(kc_ptr + (b * s_kcb + slot * s_kct + h * s_kch)[:, None] + d[None, :], kx, mask=mask)
    vx = tl.load(v_ptr + (b * s_vb + s * s_vs + h * s_vh)[:, None] + d[None, :] * s_vd, mask=mask)
    tl.store(vc_ptr + (b * s_vcb + slot * s_vct + h * s_vch)[:, None] + d[None, :], vx, mask=mask)


# --- decode_attention -------------------------------------------------------------------


@triton.jit
def softcap_fn(s, cap):
    """cap * tanh(s / cap): an odd Taylor polynomial near 0 (no cancellation), else
    (1 - e^-2|x|) / (1 + e^-2|x|) (+-1 for large |x|, never NaN)."""
    x = s / cap
    ax = tl.abs(x)
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    return cap * tl.where(ax < 0.0625, small, big)


@triton.jit
def attention_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, out_ptr, o_ws_ptr, lse_ws_ptr,
    B, SQ, H, G, KVH, D, T_MAX, WINDOW, SPLITS, M_TILES,
    s_qb, s_qs, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
    scale, softcap,
    SOFTCAP: tl.constexpr, DIRECT: tl.constexpr, HALF: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    split = pid % SPLITS
    m_tile = (pid // SPLITS) % M_TILES
    kvh = (pid // (SPLITS * M_TILES)) % KVH
    b = (pid // (SPLITS * M_TILES * KVH)).to(tl.int64)
    length = tl.load(lens_ptr + b)
    valid = (length >= SQ) & (length <= T_MAX)

    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < SQ * G
    qi = rows // G
    head = (kvh * G + rows % G).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    mask_d = dims < D
    q_off = b * s_qb + qi.to(tl.int64) * s_qs + head * s_qh
    q = tl.load(q_ptr + q_off[:, None] + dims[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:  # bf16 under the interpreter, whose tl.dot cannot multiply bf16
        q = to_fp32(q)
    pos = length - SQ + qi  # each query's position

    # Keys some query of the row sees: [lo, hi). WINDOW is huge when there is no window.
    hi = tl.where(valid, length, 0)
    lo = tl.maximum(length - SQ - WINDOW + 1, 0)
    lo = tl.minimum(lo, hi)
    n_tiles = tl.cdiv(hi - lo, BLOCK_N)
    t0 = n_tiles * split // SPLITS
    t1 = n_tiles * (split + 1) // SPLITS

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = k_ptr + b * s_kb + kvh.to(tl.int64) * s_kh
    v_base = v_ptr + b * s_vb + kvh.to(tl.int64) * s_vh
    for t in range(t0, t1):
        keys = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = keys < hi
        # Keys past the row's end read its last key (in bounds, no mask), then score -inf.
        kv_off = tl.minimum(keys, hi - 1).to(tl.int64)[:, None] * s_kt + dims[None, :]
        if EVEN_D:
            kt = tl.load(k_base + kv_off)
        else:
            kt = tl.load(k_base + kv_off, mask=mask_d[None, :], other=0.0)
        if UPCAST:
            kt = to_fp32(kt)
        if HALF:  # fp16 / bf16 MMA, fp32 accumulation: exact products
            s = tl.dot(q, tl.trans(kt)) * scale
        else:
            s = tl.dot(q, tl.trans(kt), input_precision="tf32x3") * scale
        if SOFTCAP:
            s = softcap_fn(s, softcap)
        allowed = mask_n[None, :] & (keys[None, :] <= pos[:, None]) & (pos[:, None] - keys[None, :] < WINDOW)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        kv_off = tl.minimum(keys, hi - 1).to(tl.int64)[:, None] * s_vt + dims[None, :]
        if EVEN_D:
            vt = tl.load(v_base + kv_off)
        else:
            vt = tl.load(v_base + kv_off, mask=mask_d[None, :], other=0.0)
        if UPCAST:
            vt = to_fp32(vt)
        if HALF:  # P = P_high + P_low in v's dtype: two MMAs, P to about 16 significant bits
            p_high = p.to(vt.dtype)
            pv = tl.dot(p_high, vt)
            pv = tl.dot((p - p_high.to(tl.float32)).to(vt.dtype), vt, pv)
        else:
            pv = tl.dot(p, vt, input_precision="tf32x3")
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if DIRECT:
        o = tl.where(valid, o, float("nan"))
        o_off = ((b * SQ + qi) * H + head) * D
        tl.store(out_ptr + o_off[:, None] + dims[None, :], output_value(o, out_ptr),
                 mask=mask_m[:, None] & mask_d[None, :])
    else:
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        ws_row = ((split.to(tl.int64) * B + b) * SQ + qi) * H + head
        tl.store(o_ws_ptr + (ws_row * D)[:, None] + dims[None, :], o, mask=mask_m[:, None] & mask_d[None, :])
        tl.store(lse_ws_ptr + ws_row, lse, mask=mask_m)


@triton.jit
def combine_kernel(
    o_ws_ptr, lse_ws_ptr, lens_ptr, out_ptr,
    ROWS, SQ, H, D, T_MAX, SPLITS,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows (b, i, h) flattened; the splits in order."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = row < ROWS
    length = tl.load(lens_ptr + row // (SQ * H), mask=mask_r, other=0)
    valid = (length >= SQ) & (length <= T_MAX)
    dims = tl.arange(0, BLOCK_D)
    mask = mask_r[:, None] & (dims < D)[None, :]
    top = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for s in range(0, SPLITS):
        top = tl.maximum(top, tl.load(lse_ws_ptr + s * ROWS + row, mask=mask_r, other=float("-inf")))
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for s in range(0, SPLITS):
        w = tl.exp(tl.load(lse_ws_ptr + s * ROWS + row, mask=mask_r, other=float("-inf")) - top)
        o = tl.load(o_ws_ptr + ((s * ROWS + row) * D)[:, None] + dims[None, :], mask=mask, other=0.0)
        total += w
        acc += w[:, None] * o
    o = acc / tl.where(total > 0, total, 1.0)[:, None]
    o = tl.where(valid[:, None], o, float("nan"))
    tl.store(out_ptr + (row * D)[:, None] + dims[None, :], output_value(o, out_ptr), mask=mask)


# --- sample -----------------------------------------------------------------------------


@triton.jit
def load_logits(logits_ptr, row_c, row_u, cols, mask, cfg_scale, CFG: tl.constexpr):
    """The fp32 logits of the row sampled: with CFG, u + (c - u) * scale (Liquid's expression,
    evaluated in that order; the launch disables FMA contraction)."""
    x = to_fp32(tl.load(logits_ptr + row_c + cols, mask=mask, other=0.0))
    if CFG:
        u = to_fp32(tl.load(logits_ptr + row_u + cols, mask=mask, other=0.0))
        x = u + (x - u) * cfg_scale
    return x


@triton.jit
def scaled(x, temperature):
    """x / temperature, correctly rounded like torch's division, -0 made +0 (ties compare equal)."""
    y = tl.math.div_rn(x, tl.full(x.shape, 0.0, tl.float32) + temperature)
    return tl.where(y == 0.0, 0.0, y)


@triton.jit
def order_key(y):
    """int64 keys in [0, 2^32) ordered like the fp32 values y (no NaN, no -0)."""
    bits = y.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key.to(tl.int64) + 2147483648


@triton.jit
def radix_select(logits_ptr, row_c, row_u, V, cfg_scale, temperature, y_max, floor_key, target,
                 CFG: tl.constexpr, MASS: tl.constexpr, BLOCK_V: tl.constexpr):
    """The largest key t with weight(key >= t) >= target among the tokens with key >= floor_key,
    weights 1 (MASS False: counts, exact in fp32) or exp(y - y_max); 4 bits per pass, from the top.
    Where rounding leaves no digit satisfying the bound, the digit 0 (keeps more) is taken."""
    digits = tl.arange(0, 16)
    prefix = tl.full((), 0, tl.int64)
    above = tl.full((), 0.0, tl.float32)
    for level in range(0, 8):
        shift = 28 - 4 * level
        bins = tl.zeros((16,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            y = scaled(load_logits(logits_ptr, row_c, row_u, cols, mask, cfg_scale, CFG), temperature)
            key = order_key(y)
            inside = mask & (key >= floor_key) & ((key >> (shift + 4)) == prefix)
            if MASS:
                weight = tl.where(inside, tl.exp(y - y_max), 0.0)
            else:
                weight = tl.where(inside, 1.0, 0.0)
            digit = ((key >> shift) & 15).to(tl.int32)
            bins += tl.sum(tl.where(digit[:, None] == digits[None, :], weight[:, None], 0.0), axis=0)
        suffix = tl.sum(tl.where(digits[None, :] >= digits[:, None], bins[None, :], 0.0), axis=1)
        chosen = tl.max(tl.where(above + suffix >= target, digits, 0), axis=0)
        above += tl.sum(tl.where(digits > chosen, bins, 0.0), axis=0)
        prefix = prefix * 16 + chosen.to(tl.int64)
    return prefix


@triton.jit
def sample_kernel(
    logits_ptr, uniform_ptr, tokens_ptr, status_ptr,
    V, P, row_stride, cfg_scale, temperature, top_k, top_p,
    CFG: tl.constexpr, GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row_c = r * row_stride
    row_u = (r + P) * row_stride

    # 1. validity, argmax of x (lowest index), max of y = x / T; lane-wise, then reduced.
    bad = tl.zeros((BLOCK_V,), tl.int32)
    neg_inf = tl.zeros((BLOCK_V,), tl.int32)
    best = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    best_at = tl.full((BLOCK_V,), 2147483647, tl.int32)
    y_best = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = load_logits(logits_ptr, row_c, row_u, cols, mask, cfg_scale, CFG)
        bad += (mask & ((x != x) | (x == float("inf")))).to(tl.int32)
        neg_inf += (mask & (x == float("-inf"))).to(tl.int32)
        better = mask & (x > best)  # strictly: a lane keeps its first (lowest) index
        best = tl.where(better, x, best)
        best_at = tl.where(better, cols, best_at)
        if not GREEDY:
            y_best = tl.maximum(y_best, tl.where(mask, scaled(x, temperature), float("-inf")))
    valid = (tl.sum(bad, axis=0) == 0) & (tl.sum(neg_inf, axis=0) < V)
    x_max = tl.max(best, axis=0)
    argmax = tl.min(tl.where(best == x_max, best_at, 2147483647), axis=0)

    if GREEDY:
        token = argmax.to(tl.int64)
    else:
        y_max = tl.max(y_best, axis=0)
        y_max = tl.where(valid, y_max, 0.0)  # an invalid row must not turn the passes below into NaN
        floor_key = tl.full((), 0, tl.int64)
        # 2. top-k: the k-th largest value's key.
        if TOP_K:
            floor_key = radix_select(logits_ptr, row_c, row_u, V, cfg_scale, temperature, y_max, floor_key,
                                     top_k * 1.0, CFG, False, BLOCK_V)
        # 3. top-p over the kept tokens' softmax.
        if TOP_P:
            kept_mass = tl.full((), 0.0, tl.float32)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                mask = cols < V
                y = scaled(load_logits(logits_ptr, row_c, row_u, cols, mask, cfg_scale, CFG), temperature)
                kept = mask & (order_key(y) >= floor_key)
                kept_mass += tl.sum(tl.where(kept, tl.exp(y - y_max), 0.0), axis=0)
            p_key = radix_select(logits_ptr, row_c, row_u, V, cfg_scale, temperature, y_max, floor_key,
                                 top_p * kept_mass, CFG, True, BLOCK_V)
            p_key = tl.minimum(p_key, order_key(y_max))
            floor_key = tl.maximum(p_key, floor_key)
        # 4. the kept mass, then the inverse-CDF draw in index order.
        mass = tl.full((), 0.0, tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            y = scaled(load_logits(logits_ptr, row_c, row_u, cols, mask, cfg_scale, CFG), temperature)
            mass += tl.sum(tl.where(mask & (order_key(y) >= floor_key), tl.exp(y - y_max), 0.0), axis=0)
        target = tl.load(uniform_ptr + r) * mass
        carry = tl.full((), 0.0, tl.float32)
        found = tl.full((), 2147483647, tl.int32)
        last = tl.full((), -1, tl.int32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            y = scaled(load_logits(logits_ptr, row_c, row_u, cols, mask, cfg_scale, CFG), temperature)
            w = tl.where(mask & (order_key(y) >= floor_key), tl.exp(y - y_max), 0.0)
            running = tl.cumsum(w, axis=0) + carry
            found = tl.minimum(found, tl.min(tl.where((running > target) & (w > 0), cols, 2147483647), axis=0))
            last = tl.maximum(last, tl.max(tl.where(w > 0, cols, -1), axis=0))
            carry = tl.max(running, axis=0)
        token = tl.where(found < V, found, tl.maximum(last, 0)).to(tl.int64)

    token = tl.where(valid, token, 0)
    tl.store(tokens_ptr + r, token)
    tl.store(status_ptr + r, tl.where(valid, 0, 1).to(tl.int32))
