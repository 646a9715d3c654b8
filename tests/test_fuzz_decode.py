"""Property-based tests (hypothesis) of the decode ops on every backend here: random sizes
(1-sized, odd, GQA groups, Sq up to 16), per-row lengths, windows, soft caps, strided queries,
dtypes and values (huge, tiny, denormal, NaN/Inf inside and outside the visible cache, ties in
the logits), compared with the fp64 reference; run-to-run identity; random bad inputs, which
must raise with a message and write nothing. Same budget rules as
tests/test_fuzz_linear_attention.py (MMFAST_FUZZ_EXAMPLES, MMFAST_FUZZ_RANDOM)."""
from __future__ import annotations

import re

import pytest
import torch

from mmfast import reference
from mmfast.ops import decode_attention, kv_cache_append, sample

from _utils import HAS_TRITON, TOLERANCES, TRITON_DEVICE, fuzz_settings

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = fuzz_settings()

# The kernels only: the reference backend is mmfast.reference, the oracle itself (a third of the
# examples compared it with itself); its own unit tests cover its layouts and dtypes.
BACKENDS = ["native"] + (["triton"] if HAS_TRITON else [])
DEVICES = {"native": "cpu", "reference": "cpu", "triton": TRITON_DEVICE}
HUGE = {torch.float32: 1e15, torch.float64: 1e100, torch.float16: 8.0, torch.bfloat16: 1e15}


def _dtypes(backend):
    return [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if backend != "triton" else [])


@st.composite
def attention_cases(draw):
    backend = draw(st.sampled_from(BACKENDS))
    kv_heads, group = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 4]))
    queries = draw(st.sampled_from([1, 1, 2, 5, 16]))
    max_tokens = draw(st.integers(queries, 70 if backend == "triton" else 700))
    batch = draw(st.integers(1, 4))
    return dict(backend=backend, dtype=draw(st.sampled_from(_dtypes(backend))), batch=batch, queries=queries,
                kv_heads=kv_heads, heads=kv_heads * group, dim=draw(st.one_of(st.integers(1, 40), st.just(128))),
                max_tokens=max_tokens, lengths=draw(st.lists(st.integers(queries, max_tokens), min_size=batch,
                                                             max_size=batch)),
                window=draw(st.sampled_from([0, 0, 1, 3, 50])), softcap=draw(st.sampled_from([0.0, 0.0, 5.0, 50.0])),
                strided_q=draw(st.booleans()),
                values=draw(st.sampled_from(["normal", "huge", "tiny", "denormal", "garbage-past-length", "special"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _attention_inputs(case):
    rng = torch.Generator().manual_seed(case["seed"])
    b, sq, h, hkv, d, t = (case[key] for key in ("batch", "queries", "heads", "kv_heads", "dim", "max_tokens"))
    q = torch.randn(b, h, sq, d, generator=rng, dtype=torch.float64).transpose(1, 2)
    k_cache = torch.randn(b, t, hkv, d, generator=rng, dtype=torch.float64)
    v_cache = torch.randn(b, t, hkv, d, generator=rng, dtype=torch.float64)
    lengths = torch.tensor(case["lengths"], dtype=torch.int32)
    kind, dtype = case["values"], case["dtype"]
    if kind == "huge":
        q, k_cache, v_cache = (x * HUGE[dtype] ** 0.5 / d for x in (q, k_cache, v_cache))
    elif kind == "tiny":
        q, k_cache = q * 1e-3, k_cache * 1e-3
    elif kind == "denormal":
        k_cache = torch.where(torch.rand(k_cache.shape, generator=rng) < 0.3, k_cache * 1e-40, k_cache)
    for row, length in enumerate(case["lengths"]):  # slots past a row's length never matter
        if kind in ("garbage-past-length", "special"):
            k_cache[row, length:] = float("nan")
            v_cache[row, length:] = float("inf")
    if kind == "special":
        k_cache[0, int(torch.randint(0, case["lengths"][0], (1,), generator=rng))] = float("inf")
    q = q.to(dtype)
    if not case["strided_q"]:
        q = q.contiguous()
    return q, k_cache.to(dtype), v_cache.to(dtype), lengths


@FUZZ
@given(attention_cases())
def test_fuzz_attention_matches_the_reference(case):
    q, k_cache, v_cache, lengths = _attention_inputs(case)
    device, backend = DEVICES[case["backend"]], case["backend"]
    args = (q.to(device), k_cache.to(device), v_cache.to(device), lengths.to(device))
    kwargs = dict(softcap=case["softcap"], window=case["window"], backend=backend)
    out = decode_attention(*args, **kwargs).cpu()
    torch.testing.assert_close(decode_attention(*args, **kwargs).cpu(), out, atol=0, rtol=0, equal_nan=True,
                               msg="run to run")
    expected = reference.decode_attention_ref(q, k_cache, v_cache, lengths, None, case["softcap"], case["window"])
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.equal(out.isnan(), expected.isnan())
    if case["values"] != "special":
        assert bool(out.isfinite().all()), "slots past a row's length leaked into its output"
    # The output is a weighted mean of v: its rounding scales with the largest |v| read, not with
    # the output (a random-seed run: -25.3 from values up to 3.6e6, 4.4e-9 of them off, failed an
    # atol of 1e-5), as the linear-attention fuzz scales its atol.
    atol, rtol = TOLERANCES[case["dtype"]]
    for row, length in enumerate(lengths.tolist()):  # each row against the values it reads
        magnitude = max(1.0, _largest_finite(v_cache[row, :length]))
        torch.testing.assert_close(out[row].double(), expected[row].double(), atol=2 * atol * magnitude,
                                   rtol=2 * rtol, equal_nan=True)


def _largest_finite(values: torch.Tensor) -> float:
    """max |v| over the finite entries (0 for none)."""
    values = values.double().abs()
    values = values[values.isfinite()]
    return float(values.max()) if values.numel() else 0.0


@st.composite
def sampler_cases(draw):
    backend = draw(st.sampled_from(BACKENDS))
    vocab = draw(st.one_of(st.integers(1, 300), st.just(8192)))
    return dict(backend=backend, dtype=draw(st.sampled_from(_dtypes(backend))), vocab=vocab,
                pairs=draw(st.integers(1, 4)), cfg_scale=draw(st.sampled_from([None, 1.0, 7.0])),
                temperature=draw(st.sampled_from([0.0, 0.3, 1.0, 1.7])), top_k=draw(st.integers(0, vocab + 2)),
                top_p=draw(st.sampled_from([1.0, 0.96, 0.5, 0.1, 0.0])),
                values=draw(st.sampled_from(["normal", "ties", "masked", "huge", "special"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _sampler_inputs(case):
    rng = torch.Generator().manual_seed(case["seed"])
    rows = case["pairs"] * (2 if case["cfg_scale"] is not None else 1)
    logits = 3 * torch.randn(rows, case["vocab"], generator=rng)
    kind = case["values"]
    if kind == "ties":
        logits = logits.round()
    elif kind == "masked":
        logits = logits.masked_fill(torch.rand(logits.shape, generator=rng) < 0.7, float("-inf"))
        logits[:, 0] = 0.0  # every row keeps a finite entry
    elif kind == "huge":
        logits = logits * 1e4
    elif kind == "special":
        logits[0, int(torch.randint(0, case["vocab"], (1,), generator=rng))] = float("nan")
        logits[-1] = float("-inf")
    uniform = torch.rand(case["pairs"], generator=rng)
    return logits.to(case["dtype"]), uniform


@FUZZ
@given(sampler_cases())
def test_fuzz_sample_matches_the_reference(case):
    logits, uniform = _sampler_inputs(case)
    device, backend = DEVICES[case["backend"]], case["backend"]
    kwargs = dict(temperature=case["temperature"], top_k=case["top_k"], top_p=case["top_p"],
                  cfg_scale=case["cfg_scale"], return_status=True)
    tokens, status = sample(logits.to(device), uniform=uniform.to(device), backend=backend, **kwargs)
    again, _ = sample(logits.to(device), uniform=uniform.to(device), backend=backend, **kwargs)
    want_tokens, want_status = sample(logits, uniform=uniform, backend="reference", **kwargs)
    assert torch.equal(tokens.cpu(), again.cpu()), "run to run"
    assert torch.equal(status.cpu(), want_status)
    assert bool(((tokens >= 0) & (tokens < case["vocab"])).all())
    assert torch.equal(tokens.cpu(), want_tokens)


@FUZZ
@given(st.sampled_from(BACKENDS), st.integers(1, 3), st.integers(1, 4), st.integers(1, 9),
       st.lists(st.integers(-2, 12), min_size=3, max_size=3), st.integers(0, 2**31 - 1))
def test_fuzz_append_writes_its_slots_or_nothing(backend, batch, new_tokens, max_tokens, lengths, seed):
    device = DEVICES[backend]
    rng = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(batch, max_tokens, 2, 3, generator=rng).to(device)
    v_cache = torch.randn(batch, max_tokens, 2, 3, generator=rng).to(device)
    k, v = torch.randn(batch, new_tokens, 2, 3, generator=rng).to(device), torch.randn(batch, new_tokens, 2, 3).to(device)
    lengths = torch.tensor(lengths[:batch], dtype=torch.int32, device=device)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    fits = bool(((lengths >= 0) & (lengths + new_tokens <= max_tokens)).all()) and new_tokens <= max_tokens
    if fits:
        reference.kv_cache_append_ref(expected_k, expected_v, k, v, lengths)
        kv_cache_append(k_cache, v_cache, k, v, lengths, backend=backend)
    elif device == "cpu" or new_tokens > max_tokens:  # every backend on CPU tensors; a shape error anywhere
        with pytest.raises(ValueError, match="kv_cache_append"):
            kv_cache_append(k_cache, v_cache, k, v, lengths, backend=backend)
    else:  # CUDA (no host synchronisation): a row whose slots fall outside the cache is skipped
        for b in range(batch):
            if 0 <= int(lengths[b]) <= max_tokens - new_tokens:
                reference.kv_cache_append_ref(expected_k[b:b + 1], expected_v[b:b + 1], k[b:b + 1], v[b:b + 1],
                                              lengths[b:b + 1])
        kv_cache_append(k_cache, v_cache, k, v, lengths, backend=backend)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


# Each mutation and what its message must say (every backend).
EXPECTED_MESSAGES = {
    "q-rank": r"q must be \(B=2, Sq, H, D=\d+\) like the caches, got shape",
    "heads": r"the query heads H = \d+ must be a multiple of the KV heads H_kv = \d+ \(GQA\)",
    "seqlens-dtype": r"cache_seqlens must be int32 \(B,\).*got torch\.int64",
    "seqlens-shape": r"cache_seqlens must be \(2,\), one length per row, got",
    "mixed-dtype": r"all inputs must have the same dtype, got k_cache: torch\.float32, v_cache: torch\.float64",
    "mixed-device": r"all inputs must have the same device, got q: meta, k_cache: cpu",
    "int-dtype": r"k_cache must be float32, float16, bfloat16 or float64, got torch\.int32",
    "queries": r"q must hold 1 to 16 new tokens per row \(Sq\), got 17",
    "cache-shapes": r"k_cache and v_cache must have the same shape",
    "lengths": r"cache_seqlens\[0\] = 7 is out of range.*must lie in \[1, T_max = 6\]",
    "softcap": r"softcap must be >= 0 \(0: none\), got -1",
    "window": r"window must be >= 0 \(0: none\), got -2",
}
BAD = list(EXPECTED_MESSAGES)


@FUZZ
@given(st.sampled_from(["native", "reference", "torch.ops"]), st.sampled_from(BAD), st.integers(1, 3),
       st.integers(1, 9))
def test_fuzz_bad_attention_inputs_raise_clear_errors(backend, mutation, kv_heads, dim):
    q = torch.randn(2, 1, 2 * kv_heads, dim)
    k_cache, v_cache = torch.randn(2, 6, kv_heads, dim), torch.randn(2, 6, kv_heads, dim)
    lengths, softcap, window = torch.tensor([6, 1], dtype=torch.int32), 0.0, 0
    if mutation == "q-rank":
        q = q[0]
    elif mutation == "heads":
        hypothesis.assume(kv_heads > 1)  # every H is a multiple of H_kv = 1
        q = torch.randn(2, 1, 2 * kv_heads + 1, dim)
    elif mutation == "seqlens-dtype":
        lengths = lengths.long()
    elif mutation == "seqlens-shape":
        lengths = lengths[:1]
    elif mutation == "mixed-dtype":
        v_cache = v_cache.double()
    elif mutation == "mixed-device":
        q = q.to("meta")
    elif mutation == "int-dtype":
        q, k_cache, v_cache = q.int(), k_cache.int(), v_cache.int()
    elif mutation == "queries":
        q = torch.randn(2, 17, 2 * kv_heads, dim)
    elif mutation == "cache-shapes":
        v_cache = v_cache[:, :5]
    elif mutation == "lengths":
        lengths = torch.tensor([7, 1], dtype=torch.int32)
    elif mutation == "softcap":
        softcap = -1.0
    elif mutation == "window":
        window = -2
    with pytest.raises((ValueError, TypeError)) as error:
        if backend == "torch.ops":
            torch.ops.mmfast.decode_attention(q, k_cache, v_cache, lengths, 1.0, softcap, window)
        else:
            decode_attention(q, k_cache, v_cache, lengths, softcap=softcap, window=window, backend=backend)
    assert re.search("^decode_attention: " + EXPECTED_MESSAGES[mutation], str(error.value)), str(error.value)


# ---- regressions: the shrunk examples of failures the fuzz suite found -------------------------
