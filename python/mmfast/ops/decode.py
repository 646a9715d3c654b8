"""KV-cached autoregressive decoding (Liquid's image generation, any Llama / Gemma decoder):
public API, input checks and fake kernels.

Ops (schemas in csrc/registration.cpp; Triton twins in the namespace mmfast_triton):
  kv_cache_append(k_cache!, v_cache!, k, v, cache_seqlens) -> ()       in place
  decode_attention(q, k_cache, v_cache, cache_seqlens, scale, softcap, window) -> out
  sample(logits, uniform, temperature, top_k, top_p, cfg_scale?) -> (tokens, status)
  decode_linear(x, weight, bias?) -> y                                 F.linear for few rows
Caches are static and preallocated, (B, T_max, H_kv, D) (FlashAttention's kvcache layout);
cache_seqlens is (B,) int32. The exact rules are in mmfast.reference.decode. The ops are for
inference: differentiating decode_attention or decode_linear raises (the native and Triton
backends; the reference backend is plain torch ops, differentiable as such).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _backend, _extension, reference
from ._autocast import autocast_inputs
from ._checks import check_float, check_no_forward_transforms, check_same, check_tensors, is_integer, is_real

__all__ = ["kv_cache_append", "decode_attention", "sample", "decode_linear", "MAX_DECODE_QUERIES",
           "MIN_TEMPERATURE"]

MAX_DECODE_QUERIES = 16
MIN_TEMPERATURE = 1e-5  # temperatures in (0, 1e-5) are raised to it (Liquid's max(temperature, 1e-5))


# --- input checks ---------------------------------------------------------------------


def _check_seqlens(op: str, cache_seqlens: torch.Tensor, batch: int, device) -> None:
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"{op}: cache_seqlens must be int32 (B,), as flash_attn_with_kvcache's (pass lengths.int()), "
                        f"got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"{op}: cache_seqlens must be ({batch},), one length per row, got "
                         f"{tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise TypeError(f"{op}: all inputs must have the same device, got the caches on {device}, cache_seqlens "
                        f"on {cache_seqlens.device}")


# Said with a shape mismatch: the likeliest cause is a cache or token tensor in SDPA's head-major layout.
_CACHE_LAYOUT = ("; the caches are (B, T_max, H_kv, D) and the tokens (B, S, H, D), token-major as in "
                 "flash_attn_with_kvcache, not SDPA's (B, H, S, D): transpose(1, 2) a head-major tensor")


def _check_caches(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D (B, T_max, H_kv, D) tensor, got shape {tuple(t.shape)}")
        check_float(op, name, t)
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a unit stride along D (a static cache is preallocated "
                             f"contiguous), got strides {t.stride()}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    check_same(op, {"k_cache": k_cache, "v_cache": v_cache}, "dtype")
    check_same(op, {"k_cache": k_cache, "v_cache": v_cache}, "device")


def check_append(k_cache, v_cache, k, v, cache_seqlens) -> None:
    op = "kv_cache_append"
    _check_caches(op, k_cache, v_cache)
    batch, max_tokens, kv_heads, dim = k_cache.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2:] != (kv_heads, dim):
            raise ValueError(f"{op}: {name} must be (B={batch}, S, H_kv={kv_heads}, D={dim}) like the caches, got "
                             f"shape {tuple(t.shape)}{_CACHE_LAYOUT}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] > max_tokens:
        raise ValueError(f"{op}: {k.shape[1]} new tokens do not fit a cache of T_max = {max_tokens}")
    check_same(op, {"k_cache": k_cache, "k": k, "v": v}, "dtype")
    check_same(op, {"k_cache": k_cache, "k": k, "v": v}, "device")
    _check_seqlens(op, cache_seqlens, batch, k_cache.device)


def _check_caches_writable(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor) -> None:
    """ValueError for caches whose slots share memory (an expand()ed cache, or k_cache and
    v_cache over the same or overlapping bytes): an append would write one slot through another
    and lose tokens (torch's in-place ops refuse the same); and for new tokens whose bytes lie
    inside a cache's span (a view of the cache: read while their slots are written, in parallel).
    The native op checks the same in C++. Not judged while torch.compile traces, nor for fake and
    meta tensors (no memory)."""
    if torch.compiler.is_compiling() or k_cache.is_meta or _is_fake(k_cache):
        return
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if torch._debug_has_internal_overlap(t) == 1:  # 1: yes; 2: too hard to tell (not refused)
            raise ValueError(f"{op}: {name} has elements that share memory (an expand()ed or broadcast tensor, "
                             f"strides {t.stride()}); every slot is written: pass a cache of its own, e.g. .contiguous()")
    if _memory_overlaps(k_cache, v_cache):
        raise ValueError(f"{op}: k_cache and v_cache share memory; each needs its own (two slices of one "
                         "buffer are fine when they do not overlap)")
    for cache_name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        for name, t in (("k", k), ("v", v)):
            if _spans_overlap(cache, t):
                raise ValueError(f"{op}: {name} overlaps {cache_name}'s memory (a view of the cache?): its tokens "
                                 "could be read after their slots are written; pass a copy (.clone())")


def _spans_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b share storage and their byte spans (first to last element) intersect: a
    conservative test (two interleaved views of one buffer that share no element are refused too)."""
    if not _shares_storage(a, b):
        return False
    def span(t):
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()
    (a_start, a_end), (b_start, b_end) = span(a), span(b)
    return a_start < b_end and b_start < a_end


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() > 0 and b.numel() > 0 and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _memory_overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b are views of the same bytes or, both contiguous, of overlapping ranges
    (at::get_overlap_status's Full / Partial; interleaved non-contiguous views are not judged)."""
    if not _shares_storage(a, b):
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    if not (a.is_contiguous() and b.is_contiguous()):
        return False
    a_end, b_end = a.data_ptr() + a.numel() * a.element_size(), b.data_ptr() + b.numel() * b.element_size()
    return a.data_ptr() < b_end and b.data_ptr() < a_end


def _check_caches_not_inference(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """RuntimeError, as torch's in-place ops give, for caches made under inference_mode and
    written outside it (torch.compile handles mutation itself: not judged while tracing)."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.is_inference():
            raise RuntimeError(f"{op}: {name} is an inference tensor (made under torch.inference_mode()), and an "
                               "in-place update to one outside inference mode is not allowed (as in torch): append "
                               "under torch.inference_mode(), or make the caches outside it")


def _is_fake(t: torch.Tensor) -> bool:
    """A FakeTensorMode tensor (shape propagation, export): its values cannot be read."""
    return torch._subclasses.fake_tensor.is_fake(t)


def check_append_needs_no_grad(k_cache, v_cache, k, v) -> None:
    """RuntimeError when grad mode is on and an input requires grad: the in-place append has no
    gradient, which would otherwise be lost without a word (every backend; a decode loop under
    inference_mode pays one grad-mode read)."""
    if torch.is_grad_enabled():
        needing = [name for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v))
                   if t.requires_grad]
        if needing:
            verb = "requires" if len(needing) == 1 else "require"
            raise RuntimeError(f"kv_cache_append: {', '.join(needing)} {verb} grad, but the cache append is "
                               "inference-only (no gradient flows through it); run the decode step under "
                               "torch.no_grad() or torch.inference_mode()")


FLOAT32_MAX = torch.finfo(torch.float32).max


def check_fits_float32(op: str, name: str, value, why: str) -> None:
    """ValueError for a scalar the kernels compute with in float32 that is past its range (it
    became inf there: every score or weight NaN), in the C++ glue's words (check_fits_float)."""
    if isinstance(value, (torch.SymInt, torch.SymFloat)):  # traced: no guard on a symbolic value
        return
    if not abs(value) <= FLOAT32_MAX:
        raise ValueError(f"{op}: {name} must be a finite number within float32's range (|x| <= "
                         f"{FLOAT32_MAX:.8g}: {why}), got {value!r}")


_SCORES_FP32 = "the scores are float32 for all but float64 inputs"


def check_attention(q, k_cache, v_cache, cache_seqlens, softcap: float = 0.0, window: int = 0,
                    scale: Optional[float] = None) -> None:
    op = "decode_attention"
    _check_caches(op, k_cache, v_cache)
    batch, _, kv_heads, dim = k_cache.shape
    if q.dim() != 4 or q.shape[0] != batch or q.shape[3] != dim:
        raise ValueError(f"{op}: q must be (B={batch}, Sq, H, D={dim}) like the caches, got shape {tuple(q.shape)}")
    check_float(op, "q", q)
    if not 1 <= q.shape[1] <= MAX_DECODE_QUERIES:
        raise ValueError(f"{op}: q must hold 1 to {MAX_DECODE_QUERIES} new tokens per row (Sq), got {q.shape[1]}; "
                         f"prefill longer prompts with F.scaled_dot_product_attention{_CACHE_LAYOUT}")
    if q.shape[1] > k_cache.shape[1]:
        raise ValueError(f"{op}: {q.shape[1]} new tokens do not fit a cache of T_max = {k_cache.shape[1]} "
                         "(cache_seqlens counts them: append them first)")
    if kv_heads == 0 or q.shape[2] % kv_heads != 0:
        raise ValueError(f"{op}: the query heads H = {q.shape[2]} must be a multiple of the KV heads "
                         f"H_kv = {kv_heads} (GQA){_CACHE_LAYOUT}")
    check_same(op, {"q": q, "k_cache": k_cache}, "dtype")
    check_same(op, {"q": q, "k_cache": k_cache}, "device")
    _check_seqlens(op, cache_seqlens, batch, k_cache.device)
    if softcap < 0:
        raise ValueError(f"{op}: softcap must be >= 0 (0: none), got {softcap}")
    if q.dtype != torch.float64:
        check_fits_float32(op, "softcap", softcap, _SCORES_FP32)
        if scale is not None:
            check_fits_float32(op, "scale", scale, _SCORES_FP32)
    if window < 0:
        raise ValueError(f"{op}: window must be >= 0 (0: none), got {window}")


def _check_attention_scalars(q: torch.Tensor, scale, softcap, window) -> None:
    """TypeError / ValueError for decode_attention's scalars that would otherwise be coerced
    (window=2.9 -> 2, True -> 1) or turn every output into NaN (a NaN or infinite scale or
    softcap), and for D = 0 (whose default scale D ** -0.5 does not exist). Not while
    torch.compile traces (a scale may be symbolic there; the compiled op checks softcap and
    window >= 0 itself)."""
    op = "decode_attention"
    if torch.compiler.is_compiling():
        return
    if window is not None and (isinstance(window, torch.Tensor) or not is_integer(window)):
        raise TypeError(f"{op}: window must be an int (None or 0: no sliding window), got {window!r}")
    for name, value in (("scale", scale), ("softcap", softcap)):
        if value is None and name == "scale":
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()  # a one-element tensor, as float() takes it
        if not is_real(value):
            raise TypeError(f"{op}: {name} must be a finite number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{op}: {name} must be a finite number, got {value!r}")
        if q.dtype != torch.float64:
            check_fits_float32(op, name, value, _SCORES_FP32)
    if q.dim() == 4 and q.shape[-1] == 0:
        raise ValueError(f"{op}: the head dim D must be >= 1, got q of shape {tuple(q.shape)}")


def check_sample(logits, uniform, temperature: float, top_k: int, top_p: float, cfg_scale: Optional[float]) -> None:
    op = "sample"
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{op}: logits must be a 2-D (rows, V) tensor with V >= 1, got shape {tuple(logits.shape)}")
    check_float(op, "logits", logits)
    rows = logits.shape[0]
    if cfg_scale is not None:
        if rows % 2:
            raise ValueError(f"{op}: with cfg_scale the logits hold pairs (conditional rows first, then the "
                             f"unconditional ones), so an even number of rows; got {rows}")
        rows //= 2
    if uniform.dtype != torch.float32:
        raise TypeError(f"{op}: uniform must be float32 ({rows},), one number in [0, 1) per sampled row, got "
                        f"{uniform.dtype}")
    if tuple(uniform.shape) != (rows,):
        raise ValueError(f"{op}: uniform must be float32 ({rows},), one number in [0, 1) per sampled row, got "
                         f"shape {tuple(uniform.shape)}")
    check_same(op, {"logits": logits, "uniform": uniform}, "device")
    if not temperature >= 0:
        raise ValueError(f"{op}: temperature must be >= 0 (0: greedy), got {temperature}")
    check_fits_float32(op, "temperature", temperature, "the logits are scaled in float32")
    if cfg_scale is not None:
        check_fits_float32(op, "cfg_scale", cfg_scale, "the logits are mixed in float32")
    if top_k < 0:
        raise ValueError(f"{op}: top_k must be >= 0 (0: off), got {top_k}")
    if not 0 <= top_p <= 1:
        raise ValueError(f"{op}: top_p must be in [0, 1] (1: off), got {top_p}")


def check_linear(x, weight, bias=None) -> None:
    op = "decode_linear"
    if x.dim() != 2:
        raise ValueError(f"{op}: the op takes x as (M, K), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight must be (N, K={x.shape[1]}), got shape {tuple(weight.shape)}")
    check_float(op, "x", x)
    tensors = {"x": x, "weight": weight, **({} if bias is None else {"bias": bias})}
    check_same(op, tensors, "dtype")
    check_same(op, tensors, "device")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")


# --- fake kernels ----------------------------------------------------------------------


def _fake_append(k_cache, v_cache, k, v, cache_seqlens):
    check_append(k_cache, v_cache, k, v, cache_seqlens)


def _fake_attention(q, k_cache, v_cache, cache_seqlens, scale, softcap, window):
    check_attention(q, k_cache, v_cache, cache_seqlens, softcap, window, scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _fake_sample(logits, uniform, temperature, top_k, top_p, cfg_scale):
    check_sample(logits, uniform, temperature, top_k, top_p, cfg_scale)
    rows = uniform.shape[0]
    return logits.new_empty((rows,), dtype=torch.int64), logits.new_empty((rows,), dtype=torch.int32)


def _fake_linear(x, weight, bias):
    check_linear(x, weight, bias)
    return x.new_empty((x.shape[0], weight.shape[0]))


_TRAIN_WITH = {"decode_attention": "torch.nn.functional.scaled_dot_product_attention",
               "decode_linear": "torch.nn.functional.linear"}


@torch.library.custom_op("mmfast_autograd::inference_only_backward", mutates_args=())
def _inference_only_backward(grad: torch.Tensor, op: str) -> torch.Tensor:
    """The gradient of an inference-only op: raises when it runs. An op rather than a raise in
    the backward formula, so that torch.compile can trace a grad-mode forward (AOTAutograd
    traces the backward ahead, on fake tensors) and only a real backward() fails, as in eager."""
    raise RuntimeError(f"{op} is inference-only (a KV-cached decode step): it has no gradient; train with "
                       f"{_TRAIN_WITH.get(op, 'torch')}, or run the step under torch.no_grad() / "
                       "torch.inference_mode()")


@_inference_only_backward.register_fake
def _(grad, op):
    return torch.empty_like(grad)


def _inference_only_autograd(op: str):
    """(backward, setup_context) of an inference-only op: every float input's gradient is
    _inference_only_backward's (so a compiled backward cannot drop the error for the inputs
    that do require grad)."""
    def setup_context(ctx, inputs, output):
        ctx.shapes = [t.shape if isinstance(t, torch.Tensor) and t.is_floating_point() else None for t in inputs]

    def backward(ctx, grad):
        return tuple(None if shape is None else _inference_only_backward(grad.new_empty(shape), op)
                     for shape in ctx.shapes)

    return backward, setup_context


def register_fakes_and_autograd(namespace: str) -> None:
    """Fake kernels of the decode ops in `namespace`, and decode_attention's error on backward."""
    torch.library.register_fake(f"{namespace}::kv_cache_append", _fake_append)
    torch.library.register_fake(f"{namespace}::decode_attention", _fake_attention)
    torch.library.register_fake(f"{namespace}::sample", _fake_sample)
    backward, setup_context = _inference_only_autograd("decode_attention")
    torch.library.register_autograd(f"{namespace}::decode_attention", backward, setup_context=setup_context)
    if namespace == "mmfast":  # no Triton twin: on a GPU this is cuBLAS's GEMV
        torch.library.register_fake(f"{namespace}::decode_linear", _fake_linear)
        backward, setup_context = _inference_only_autograd("decode_linear")
        torch.library.register_autograd(f"{namespace}::decode_linear", backward, setup_context=setup_context)


if _extension.loaded():
    register_fakes_and_autograd("mmfast")


# --- public API ---------------------------------------------------------------------------


def kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cache_seqlens: torch.Tensor, *, backend: Optional[str] = None) -> None:
    """Writes new keys and values into static caches, in place, each row at its own length.

    k_cache, v_cache: (B, T_max, H_kv, D), unit stride along D; k, v: (B, S, H_kv, D), any
    strides; same float dtype (fp64 not on Triton) and device. cache_seqlens: (B,) int32, the lengths BEFORE this
    append: row b's tokens go to slots [len_b, len_b + S); nothing else is written (the caller
    then adds S to its lengths). Raises ValueError / TypeError for shapes, dtypes, devices, caches
    whose slots share memory (an expand()ed cache, or k_cache and v_cache overlapping),
    RuntimeError when grad mode is on and an input requires grad (the append has no gradient),
    or for caches made under torch.inference_mode() written outside it (as torch's in-place ops);
    bumps the caches' version counters, as torch's in-place ops do;
    a row whose slots fall outside [0, T_max) raises ValueError on the CPU (every backend) and
    is skipped on CUDA (no host synchronisation: check lengths yourself if they may overflow).
    Matches flash_attn_with_kvcache's in-place append (FlashAttention).
    """
    check_tensors("kv_cache_append",
                  {"k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v, "cache_seqlens": cache_seqlens})
    k, v = autocast_inputs(k_cache.dtype, k_cache.device, k, v)  # the new tokens follow the cache's dtype
    check_append_needs_no_grad(k_cache, v_cache, k, v)
    _check_caches_not_inference("kv_cache_append", k_cache, v_cache)
    chosen = _backend.resolve("kv_cache_append", k_cache.device, backend)
    if chosen != "native":  # the compiled op checks the same in C++ (a decode loop calls this per layer)
        check_append(k_cache, v_cache, k, v, cache_seqlens)
        _check_caches_writable("kv_cache_append", k_cache, v_cache, k, v)
    if _checks_lengths_here(chosen, cache_seqlens):
        _check_lengths_fit("kv_cache_append", cache_seqlens, k.shape[1], k_cache.shape[1])
    if chosen == "reference":
        reference.kv_cache_append_ref(k_cache, v_cache, k, v, cache_seqlens)
        return
    _backend.op_overload("kv_cache_append", chosen)(k_cache, v_cache, k, v, cache_seqlens)
    if chosen == "native" and not torch.compiler.is_compiling():
        # what torch's in-place ops do (the C++ op does not): a graph that saved a cache view
        # before this append then refuses to backpropagate through stale values
        torch.autograd.graph.increment_version((k_cache, v_cache))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, *,
                     scale: Optional[float] = None, softcap: float = 0.0, window: Optional[int] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Attention of a few new tokens per row over a static KV cache with per-row lengths.

    q: (B, Sq, H, D) with 1 <= Sq <= min(16, T_max) (1 for decoding; more for speculative or chunked
    steps, causal among the new tokens); k_cache, v_cache: (B, T_max, H_kv, D) with H a
    multiple of H_kv (GQA: the H / H_kv query heads of a group share one K/V read); fp32,
    fp16, bf16, fp64 (not on Triton); D up to 256 on CUDA, any D on the CPU. cache_seqlens:
    (B,) int32, the tokens in the cache
    INCLUDING the Sq new ones (append first). scale: default D ** -0.5. softcap > 0: Gemma-2's
    logit soft-capping softcap * tanh(s / softcap). window: a sliding window of that many
    tokens (transformers' Gemma-2 / Mistral semantics: key j visible to position p when
    p - j < window); None or 0: none. Returns (B, Sq, H, D) in q's dtype; scores, softmax and
    sums in fp32 (fp64). Rows with cache_seqlens outside [Sq, T_max] raise ValueError on the
    CPU (every backend) and give NaN rows on CUDA. Raises ValueError / TypeError for shapes, dtypes,
    devices, a window that is not an int, a scale or softcap that is not a finite number (or,
    but for fp64 inputs, past float32's range: |x| > 3.4e38), D = 0.
    """
    check_tensors("decode_attention", {"q": q, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": cache_seqlens})
    q, = autocast_inputs(k_cache.dtype, k_cache.device, q)  # the queries follow the cache's dtype
    _check_attention_scalars(q, scale, softcap, window)
    window = window or 0
    chosen = _backend.resolve("decode_attention", q.device, backend)
    check_no_forward_transforms("decode_attention", chosen, q, k_cache, v_cache)
    if chosen != "native":  # the compiled op checks the same in C++
        check_attention(q, k_cache, v_cache, cache_seqlens, softcap, window)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _checks_lengths_here(chosen, cache_seqlens):
        _check_lengths_fit("decode_attention", cache_seqlens, q.shape[1], k_cache.shape[1])
    if chosen == "reference":
        return reference.decode_attention_ref(q, k_cache, v_cache, cache_seqlens, scale, softcap, window)
    return _backend.op_overload("decode_attention", chosen)(q, k_cache, v_cache, cache_seqlens, scale, float(softcap),
                                                           int(window))


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None, cfg_scale: Optional[float] = None,
           uniform: Optional[torch.Tensor] = None, return_status: bool = False, backend: Optional[str] = None):
    """One token per row: fused classifier-free guidance, temperature, top-k, top-p and a draw.

    logits: (rows, V) fp32 / fp16 / bf16 / fp64 (not on Triton), mixed and scaled in fp32. With
    cfg_scale, rows [0, P) are the conditional rows and [P, 2P) their unconditional twins, and
    uncond + cfg_scale * (cond - uncond) is sampled (Liquid's formula), one token per pair;
    without it, P = rows. Then, in transformers' logits-processor order (Liquid's):
    temperature (0: greedy argmax, lowest index on ties; (0, 1e-5) is raised to 1e-5 as
    Liquid does, so x / temperature stays finite for |x| up to about 3e33), top-k (0: off;
    ties with the k-th value kept, TopKLogitsWarper), top-p (in [0, 1]; 1: off; 0 keeps the largest value, with
    its ties, where TopPLogitsWarper's min_tokens_to_keep=1 keeps one token; the smallest set of largest values whose
    probability reaches top_p, the threshold-crossing token kept, TopPLogitsWarper; ties of a
    kept value all kept; the largest value always kept). No full-vocabulary sort.
    Boundaries, where samplers that sort differ: a value whose larger values' mass equals top_p
    exactly is dropped, as TopPLogitsWarper drops it (Liquid's shift-right of cumsum > top_p
    keeps it); a tie group at the top-k / top-p cut is kept whole, where a sort-based sampler
    keeps the part its sort puts first (with bf16 logits ties are common: against Liquid's
    sampler, 1-4 more tied tokens kept on about half the steps, a total-variation distance under
    1e-3 per step in a simulation). The CPU kernel compares masses in fp64, the Triton and CUDA
    ones in fp32 (top_p rounded to fp32 too): within ~1e-7 of the cut the backends may keep
    different sets.

    The draw is an inverse CDF in index order with one uniform number per row, drawn here with
    torch.rand(P, generator=generator) unless `uniform` ((P,) float32 in [0, 1)) is given
    (greedy, temperature 0, draws nothing and leaves the generator alone, as transformers' greedy
    decoding does): seeded runs are reproducible, and the draw is capturable in a CUDA graph with the default
    CUDA generator, which advances its offset on every replay (a generator of your own must be
    registered with CUDAGraph.register_generator_state). A given u outside [0, 1) (or NaN)
    raises ValueError on the CPU in eager mode when temperature > 0 (greedy never reads it);
    on CUDA and under torch.compile it is not checked (that would be a host synchronisation):
    u <= 0 draws the first kept token, u >= 1 the last.
    Returns (P,) int64 tokens in [0, V), and
    with return_status=True also (P,) int32 status: 1 for a row of invalid logits (a NaN or
    +inf, or all -inf), which gets token 0. Without return_status, invalid rows raise
    ValueError on the CPU in eager mode (the check reads the status: a host synchronisation);
    on CUDA and under torch.compile they are not checked (token 0): pass return_status=True.
    With cfg_scale, a -inf in either row of a pair can make the mix NaN (-inf - -inf, or
    cfg_scale * -inf against a finite twin): such pairs count as invalid.

    Under torch.compile a torch.Generator cannot be traced: pass `uniform` (drawn outside the
    compiled function) or use the global generator (whose compiled draws differ from eager
    ones unless torch._inductor.config.fallback_random is set). top_k must be an int,
    temperature, top_p and cfg_scale finite numbers, temperature and cfg_scale within float32's
    range (|x| <= 3.4e38: the logits are scaled in float32) (TypeError / ValueError); a generator
    that is not a torch.Generator raises TypeError; passing both uniform and generator raises
    ValueError.
    """
    check_tensors("sample", {"logits": logits, "uniform": uniform}, ("uniform",))
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be a 2-D (rows, V) tensor, got shape {tuple(logits.shape)}")
    _check_sample_scalars(temperature, top_k, top_p, cfg_scale)
    rows = logits.shape[0] // 2 if cfg_scale is not None else logits.shape[0]
    if uniform is not None and generator is not None:
        raise ValueError("sample: pass either uniform (the draws) or generator (to draw them), not both")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"sample: generator must be a torch.Generator (or None: the global one), got "
                        f"{type(generator).__name__}")
    if (temperature > 0 and isinstance(uniform, torch.Tensor) and uniform.device.type == "cpu"
            and uniform.is_floating_point() and not torch.compiler.is_compiling() and not _is_fake(uniform)
            and not bool(((uniform >= 0) & (uniform < 1)).all())):  # greedy never reads u: no check per step
        raise ValueError(f"sample: uniform must hold numbers in [0, 1), got values from {uniform.min().item()} "
                         f"to {uniform.max().item()}")
    if uniform is None:
        if generator is not None and torch.compiler.is_compiling():
            raise RuntimeError("sample: a torch.Generator cannot be traced by torch.compile; draw the uniforms "
                               "outside the compiled function and pass uniform=, or use the global generator")
        if temperature == 0:  # greedy reads no draw: the generator is left alone (as in transformers' greedy)
            uniform = torch.zeros((rows,), dtype=torch.float32, device=logits.device)
        else:
            uniform = torch.rand((rows,), generator=generator, dtype=torch.float32, device=logits.device)
    cfg = None if cfg_scale is None else float(cfg_scale)
    if temperature > 0:
        temperature = max(float(temperature), MIN_TEMPERATURE)
    chosen = _backend.resolve("sample", logits.device, backend)
    if chosen != "native":  # the compiled op checks the same in C++
        check_sample(logits, uniform, temperature, top_k, top_p, cfg)
    if chosen == "reference":
        tokens = reference.sample_ref(logits, uniform, temperature, top_k, top_p, cfg)
        status = reference.invalid_logit_rows(reference.cfg_mix_ref(logits, cfg)).int()
    else:
        tokens, status = _backend.op_overload("sample", chosen)(logits, uniform, float(temperature), int(top_k),
                                                              float(top_p), cfg)
    if return_status:
        return tokens, status
    if (logits.device.type == "cpu" and not torch.compiler.is_compiling() and not _is_fake(status)
            and bool(status.any())):
        bad = status.nonzero().flatten().tolist()
        raise ValueError(f"sample: logits rows {bad[:8]} hold a NaN or +inf, or are all -inf (after the CFG mix): "
                         "nothing to sample from")
    return tokens


def _check_sample_scalars(temperature, top_k, top_p, cfg_scale) -> None:
    """TypeError / ValueError for sample's scalar arguments that would otherwise be coerced
    (top_k=4.5 -> 4, True -> 1) or poison the logits (a NaN cfg_scale). Not while torch.compile
    traces (a temperature may be symbolic there)."""
    if torch.compiler.is_compiling():
        return
    if not is_integer(top_k):
        raise TypeError(f"sample: top_k must be an int (0: off), got {top_k!r}")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("cfg_scale", cfg_scale)):
        if (value is None and name == "cfg_scale") or isinstance(value, (torch.SymInt, torch.SymFloat)):
            continue
        if not is_real(value):
            raise TypeError(f"sample: {name} must be a finite number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"sample: {name} must be a finite number, got {value!r}")


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for the few rows of a decode step (batch x new tokens).

    x: (..., K); weight: (N, K); bias: (N,) or None; same float dtype and device. Returns
    (..., N) in x's dtype, accumulated in fp32 (fp64 for fp64) on the CPU; on CUDA with
    cuBLAS's precision (torch.backends.cuda.matmul settings apply). The CPU kernel streams the
    weights once and multiplies every row of x with each weight row while it is in cache, so
    its time is the weight bytes over the memory bandwidth for any M up to a few dozen rows
    (the small-M GEMM of the BLAS torch ships reads them at half the bandwidth or less on
    AVX2 CPUs). On CUDA it is cuBLAS (at::linear), already bandwidth-bound there. No Triton
    twin: backend="triton" raises. Inference only: differentiating it raises (the reference
    backend's F.linear excepted).
    Raises ValueError / TypeError for shapes, dtypes, devices.
    """
    check_tensors("decode_linear", {"x": x, "weight": weight, "bias": bias}, ("bias",))
    x, weight, bias = autocast_inputs("lower", x.device, x, weight, bias)  # as F.linear
    if x.dim() < 1:
        raise ValueError("decode_linear: x must have at least one dim (..., K), got a 0-d tensor")
    # Called once per projection per decode step: the reshapes only when x is not (M, K).
    rows = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    chosen = _backend.resolve("decode_linear", x.device, backend)
    check_no_forward_transforms("decode_linear", chosen, x, weight, bias)
    if chosen != "native":  # the compiled op checks the same in C++
        check_linear(rows, weight, bias)
    if chosen == "reference":
        out = reference.decode_linear_ref(rows, weight, bias)
    elif chosen == "triton":
        raise RuntimeError("decode_linear has no Triton twin (on a GPU the native op is cuBLAS): use "
                           "backend='native' or backend='reference'")
    else:
        out = _backend.op_overload("decode_linear", chosen)(rows, weight, bias)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], weight.shape[0])


def _checks_lengths_here(chosen: str, cache_seqlens: torch.Tensor) -> bool:
    """Whether the wrapper checks the lengths (a host synchronisation): for the reference, and for
    the Triton interpreter on CPU tensors in eager mode, which raise as the native CPU op does."""
    return chosen == "reference" or (chosen == "triton" and cache_seqlens.device.type == "cpu"
                                     and not torch.compiler.is_compiling())


def _check_lengths_fit(op: str, cache_seqlens: torch.Tensor, new_tokens: int, max_tokens: int) -> None:
    """ValueError naming the first row whose length is out of range, in the native CPU op's words
    (a host synchronisation: CPU and the reference only). kv_cache_append: lengths before the
    append, its slots [len, len + S) inside [0, T_max); decode_attention: lengths counting the
    Sq new tokens, in [Sq, T_max]."""
    if cache_seqlens.numel() == 0:
        return
    lengths = cache_seqlens.long()
    if op == "kv_cache_append":
        bad = (lengths < 0) | (lengths + new_tokens > max_tokens)
        reason = f"{new_tokens} new tokens need slots [len, len + {new_tokens}) inside a cache of T_max = {max_tokens}"
    else:
        bad = (lengths < new_tokens) | (lengths > max_tokens)
        reason = (f"it counts the cached tokens including the {new_tokens} new ones, so it must lie in "
                  f"[{new_tokens}, T_max = {max_tokens}]")
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: cache_seqlens[{row}] = {int(lengths[row])} is out of range: {reason}")