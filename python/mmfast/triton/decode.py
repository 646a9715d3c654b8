"""The Triton twins of the decode ops: torch.ops.mmfast_triton.kv_cache_append,
decode_attention and sample, with the schemas, checks, fake kernels and autograd of the native
ops (python/mmfast/ops/decode.py). The kernels and their design are in decode_kernels.py.

Like the CUDA kernels, these never synchronise with the host: a kv_cache_append row whose slots
fall outside [0, T_max) is skipped, a decode_attention row whose length is outside [Sq, T_max]
comes out NaN, and sample reports invalid rows in its status output.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ..ops.decode import MIN_TEMPERATURE, check_append, check_attention, check_sample, register_fakes_and_autograd
from . import decode_kernels as kernels
from ._common import INTERPRET, check_runnable, device_guard, device_sm_count, last_dim_unit

# The integer view the append copies (raw bits: exact for every dtype).
_RAW_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# Keys per attention tile under the interpreter: small, so that short test caches span several
# tiles (the online softmax).
_BLOCK_N_INTERPRET = 16
# Vocabulary entries per chunk of the sampler's passes.
_BLOCK_V = 1024
# Splits of the keys per attention row; None: about 4 programs per SM on the GPU, 1 under the
# interpreter. The tests set it to exercise the combine kernel on the CPU.
FORCE_SPLITS: Optional[int] = None
_MAX_SPLITS = 64
# Head dims the attention kernel takes (the CUDA kernel's limit too): the K and V tiles of two
# pipeline stages at D = 512 in fp32 already fill sm_90's 227 KB of shared memory per block.
MAX_HEAD_DIM = 256
# An effective "no window": larger than any position difference.
_NO_WINDOW = 1 << 30


def _attention_splits(programs: int, max_tiles: int, device: torch.device) -> int:
    if FORCE_SPLITS is not None:
        return FORCE_SPLITS
    if device.type != "cuda":
        return 1
    return max(1, min(max_tiles, triton.cdiv(4 * device_sm_count(device), programs), _MAX_SPLITS))


def _attention_tiles(rows: int, block_d: int, half: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). From offline sm_90 compiles (ptxas -v): none of these
    spill registers (fp32 with D = 256: 32 bytes), while 64-row tiles, or 32-row ones in fp32
    ("tf32x3" triples the operands), do. Not autotuned yet."""
    block_m = min(32 if half and block_d <= 128 else 16, max(16, triton.next_power_of_2(rows)))
    if INTERPRET:
        block_n = _BLOCK_N_INTERPRET
    elif block_d <= 64:
        block_n = 64
    else:
        block_n = 32 if half or block_d <= 128 else 16
    return block_m, block_n, 4 if block_d <= 64 else 8


@torch.library.custom_op("mmfast_triton::kv_cache_append", mutates_args=("k_cache", "v_cache"))
def kv_cache_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor) -> None:
    check_append(k_cache, v_cache, k, v, cache_seqlens)
    check_runnable("kv_cache_append", k_cache, v_cache, k, v)
    batch, max_tokens, kv_heads, dim = k_cache.shape
    new_tokens = k.shape[1]
    if batch == 0 or new_tokens == 0 or kv_heads == 0 or dim == 0:
        return
    bits = _RAW_BITS[k_cache.dtype]
    kc, vc, kb, vb = (t.view(bits) for t in (k_cache, v_cache, k, v))
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    block_r = max(1, min(64, 2048 // block_d, triton.next_power_of_2(new_tokens * kv_heads)))
    row_tiles, d_tiles = triton.cdiv(new_tokens * kv_heads, block_r), triton.cdiv(dim, block_d)
    with device_guard(k_cache):
        kernels.append_kernel[(batch * row_tiles * d_tiles,)](
            kc, vc, kb, vb, cache_seqlens.contiguous(),
            new_tokens, kv_heads, dim, max_tokens, row_tiles, d_tiles,
            kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
            kb.stride(0), kb.stride(1), kb.stride(2), kb.stride(3),
            vb.stride(0), vb.stride(1), vb.stride(2), vb.stride(3),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


@torch.library.custom_op("mmfast_triton::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float,
                     softcap: float, window: int) -> Tensor:
    check_attention(q, k_cache, v_cache, cache_seqlens, softcap, window, scale)
    check_runnable("decode_attention", q, k_cache, v_cache)
    batch, queries, heads, dim = q.shape
    if dim > MAX_HEAD_DIM:
        raise ValueError(f"decode_attention (triton): head dims up to {MAX_HEAD_DIM} are supported, got D = {dim}")
    max_tokens, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    q, k_cache, v_cache = last_dim_unit(q), last_dim_unit(k_cache), last_dim_unit(v_cache)
    lens = cache_seqlens.contiguous()
    group = heads // kv_heads
    half = q.dtype != torch.float32
    block_d = max(16, triton.next_power_of_2(dim))
    block_m, block_n, warps = _attention_tiles(queries * group, block_d, half)
    m_tiles = triton.cdiv(queries * group, block_m)
    programs = batch * kv_heads * m_tiles
    splits = _attention_splits(programs, max(1, triton.cdiv(max_tokens, block_n)), q.device)
    launch = dict(num_warps=warps, num_stages=2)
    with device_guard(q):
        if splits > 1:
            o_ws = q.new_empty((splits, batch, queries, heads, dim), dtype=torch.float32)
            lse_ws = q.new_empty((splits, batch, queries, heads), dtype=torch.float32)
        else:
            o_ws = lse_ws = out  # never touched
        kernels.attention_kernel[(programs * splits,)](
            q, k_cache, v_cache, lens, out, o_ws, lse_ws,
            batch, queries, heads, group, kv_heads, dim, max_tokens, window if window > 0 else _NO_WINDOW,
            splits, m_tiles,
            q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            float(scale), float(softcap) if softcap > 0 else 1.0,
            SOFTCAP=softcap > 0, DIRECT=splits == 1, HALF=half, UPCAST=INTERPRET and q.dtype == torch.bfloat16,
            EVEN_D=dim == block_d,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **launch)
        if splits > 1:
            rows = batch * queries * heads
            block_r = 16
            kernels.combine_kernel[(triton.cdiv(rows, block_r),)](
                o_ws, lse_ws, lens, out, rows, queries, heads, dim, max_tokens, splits,
                BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return out


@torch.library.custom_op("mmfast_triton::sample", mutates_args=())
def sample(logits: Tensor, uniform: Tensor, temperature: float, top_k: int, top_p: float,
           cfg_scale: Optional[float]) -> tuple[Tensor, Tensor]:
    check_sample(logits, uniform, temperature, top_k, top_p, cfg_scale)
    check_runnable("sample", logits)
    rows, vocab = uniform.shape[0], logits.shape[1]
    tokens = logits.new_empty((rows,), dtype=torch.int64)
    status = logits.new_empty((rows,), dtype=torch.int32)
    if rows == 0:
        return tokens, status
    logits, uniform = last_dim_unit(logits), uniform.contiguous()
    greedy = temperature == 0
    with device_guard(logits):
        kernels.sample_kernel[(rows,)](
            logits, uniform, tokens, status,
            vocab, rows, logits.stride(0) if logits.shape[0] > 1 else vocab,
            # (0, 1e-5) raised to 1e-5 here too, as the native op's glue does
            1.0 if cfg_scale is None else float(cfg_scale), 1.0 if greedy else max(float(temperature), MIN_TEMPERATURE),
            int(min(top_k, vocab)), float(top_p),
            CFG=cfg_scale is not None, GREEDY=greedy, TOP_K=0 < top_k < vocab, TOP_P=top_p < 1,
            BLOCK_V=min(_BLOCK_V, max(16, triton.next_power_of_2(vocab))),
            num_warps=8, enable_fp_fusion=False)  # the CFG mix rounds like torch's (no FMA)
    return tokens, status


register_fakes_and_autograd("mmfast_triton")
