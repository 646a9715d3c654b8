"""The decode ops (kv_cache_append, decode_attention, sample) on every backend against the fp64
reference, the reference against PyTorch's SDPA and transformers' logits processors, and
torch.library integration and errors."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfast import reference
from mmfast.ops import decode_attention, decode_linear, kv_cache_append, sample

from _utils import HAS_TRITON, TOLERANCES, TRITON_DEVICE, at_thread_counts, backend_params

BACKENDS = backend_params()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, Sq, H, H_kv, D, T_max): Liquid's MHA hd256, GQA hd128 (Llama-3), group 8 hd64, odd D,
# chunked steps (Sq 3, 16), contexts across the CPU's 512-key chunks.
ATTENTION_SHAPES = [(2, 1, 4, 4, 256, 300), (3, 1, 8, 2, 128, 1100), (2, 1, 8, 1, 64, 40), (2, 3, 6, 3, 40, 600),
                    (1, 16, 4, 2, 64, 33), (5, 2, 2, 2, 8, 9)]


def shape_id(shape):
    return "x".join(map(str, shape))


def make_cache(shape, dtype, device, seed=0):
    batch, queries, heads, kv_heads, dim, max_tokens = shape
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, dim, generator=generator).to(device, dtype)
    k_cache = torch.randn(batch, max_tokens, kv_heads, dim, generator=generator).to(device, dtype)
    v_cache = torch.randn(batch, max_tokens, kv_heads, dim, generator=generator).to(device, dtype)
    lengths = torch.randint(queries, max_tokens + 1, (batch,), generator=generator)
    lengths[0] = max_tokens
    lengths[-1] = queries  # the shortest row: only its new tokens
    return q, k_cache, v_cache, lengths.to(device, torch.int32)


def attention_tolerance(dtype):
    """The dtype's tolerance (measured on CPU, native and Triton: at most 0.16 of it, bf16)."""
    atol, rtol = TOLERANCES[dtype]
    return dict(atol=atol, rtol=rtol)


# --- the reference against PyTorch -------------------------------------------------------------


@pytest.mark.parametrize("window", [0, 5])
def test_reference_attention_matches_sdpa(window):
    q, k_cache, v_cache, lengths = make_cache((3, 4, 8, 2, 16, 30), torch.float64, "cpu")
    out = reference.decode_attention_ref(q, k_cache, v_cache, lengths, None, 0.0, window)
    for b, length in enumerate(lengths.tolist()):
        keys = k_cache[b:b + 1, :length].transpose(1, 2).repeat_interleave(4, 1)
        values = v_cache[b:b + 1, :length].transpose(1, 2).repeat_interleave(4, 1)
        mask = reference.decode.attention_mask_ref(length, 4, window)
        expected = F.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), keys, values, attn_mask=mask)
        torch.testing.assert_close(out[b], expected[0].transpose(0, 1), atol=1e-12, rtol=1e-12)


def transformers_filter(logits, temperature, top_k, top_p):
    """The kept-token mask of transformers' TemperatureLogitsWarper, TopKLogitsWarper and
    TopPLogitsWarper applied in that order (Liquid's)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    scores = logits / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores > float("-inf")


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (50, 0.96), (4, 1.0), (10, 0.3), (0, 0.0), (3000, 0.99)])
def test_reference_filter_matches_transformers(top_k, top_p):
    generator = torch.Generator().manual_seed(top_k)
    logits = torch.randn(32, 4096, generator=generator)
    logits[:, 1:400:2] = logits[:, 0:399:2]  # ties
    logits[:4, :100] = 1.5  # a tie group holding the top-k boundary
    kept = reference.sample_probs_ref(logits, 0.8, top_k, top_p) > 0
    expected = transformers_filter(logits, 0.8, top_k, top_p)
    # Where a tie group straddles the top-p boundary transformers keeps an arbitrary part of it
    # (torch.sort is unstable); mmfast keeps all of it. Compare the rows without such a group.
    probs = reference.sample_probs_ref(logits, 0.8, top_k, 1.0)
    boundary = torch.where(kept, probs, torch.full_like(probs, 2.0)).min(-1).values
    straddled = ((probs == boundary[:, None]) & ~expected).any(-1) if top_p < 1 else torch.zeros(32, dtype=torch.bool)
    assert bool((kept[~straddled] == expected[~straddled]).all())
    assert int((~straddled).sum()) > 20


# --- kv_cache_append ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_append_writes_exactly_its_slots(backend_device, dtype):
    backend, device = backend_device
    if dtype == torch.float64 and (device != "cpu" or backend == "triton"):
        pytest.skip("fp64 on the CPU kernels only")
    k_cache = torch.full((3, 12, 2, 24), 7.0, dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, -7.0)
    k = torch.randn(3, 24, 4, 2, device=device).to(dtype).permute(0, 2, 3, 1)[:, :3]  # (3, 3, 2, 24), strided
    v = torch.randn(3, 3, 2, 24, device=device).to(dtype)
    lengths = torch.tensor([0, 5, 9], dtype=torch.int32, device=device)
    kv_cache_append(k_cache, v_cache, k, v, lengths, backend=backend)
    for b, length in enumerate(lengths.tolist()):
        assert torch.equal(k_cache[b, length:length + 3], k[b])
        assert torch.equal(v_cache[b, length:length + 3], v[b])
        outside = torch.cat([k_cache[b, :length], k_cache[b, length + 3:]])
        assert bool((outside == 7).all()), "a slot outside the append changed"
        assert bool((torch.cat([v_cache[b, :length], v_cache[b, length + 3:]]) == -7).all())


def test_append_rejects_slots_outside_the_cache():
    k_cache, v_cache = torch.zeros(2, 8, 1, 4), torch.zeros(2, 8, 1, 4)
    k = torch.ones(2, 3, 1, 4)
    for lengths in ([0, 6], [-1, 0]):
        with pytest.raises(ValueError, match="out of range"):
            kv_cache_append(k_cache, v_cache, k, k, torch.tensor(lengths, dtype=torch.int32))
        assert bool((k_cache == 0).all()), "nothing is written when a row does not fit"


# --- decode_attention -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=shape_id)
def test_attention_matches_the_reference(backend_device, dtype, shape):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and shape[5] > 600:
        pytest.skip("too slow under the Triton interpreter")
    q, k_cache, v_cache, lengths = make_cache(shape, dtype, device)
    out = decode_attention(q, k_cache, v_cache, lengths, backend=backend)
    expected = reference.decode_attention_ref(q, k_cache, v_cache, lengths)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected.double(), **attention_tolerance(dtype))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("softcap,window,scale", [(50.0, 0, None), (0.0, 7, None), (30.0, 100, 0.3), (0.0, 1, 1.0)])
def test_attention_softcap_window_scale(backend_device, softcap, window, scale):
    backend, device = backend_device
    q, k_cache, v_cache, lengths = make_cache((3, 4, 4, 2, 32, 700), torch.float32, device, seed=3)
    q = q * 4  # scores large enough for the soft cap to matter
    out = decode_attention(q, k_cache, v_cache, lengths, scale=scale, softcap=softcap, window=window, backend=backend)
    expected = reference.decode_attention_ref(q, k_cache, v_cache, lengths, scale, softcap, window)
    torch.testing.assert_close(out.double(), expected.double(), **attention_tolerance(torch.float32))


def test_attention_fp64_on_cpu():
    q, k_cache, v_cache, lengths = make_cache((2, 3, 4, 2, 40, 1500), torch.float64, "cpu")
    out = decode_attention(q, k_cache, v_cache, lengths, softcap=20.0, window=600)
    expected = reference.decode_attention_ref(q, k_cache, v_cache, lengths, None, 20.0, 600)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_attention_reads_strided_queries_and_cache_views(backend_device):
    backend, device = backend_device
    q, k_cache, v_cache, lengths = make_cache((2, 2, 4, 2, 16, 50), torch.float32, device)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Sq, H, D) stored as (B, H, Sq, D)
    bigger = torch.randn(4, 60, 2, 16, device=device)
    bigger[1:3, :50] = k_cache
    out = decode_attention(q_strided, bigger[1:3, :50], v_cache, lengths, backend=backend)
    torch.testing.assert_close(out, reference.decode_attention_ref(q, k_cache, v_cache, lengths),
                               **attention_tolerance(torch.float32))


# The last two: the KV heads a CPU task reads together (it depends on the thread count) differ
# between 1, 2 and 3 threads, for one chunk of keys and for several.
@pytest.mark.parametrize("shape", [(2, 2, 4, 2, 64, 2000), (1, 2, 16, 8, 16, 300), (1, 1, 8, 8, 64, 1500)],
                         ids=shape_id)
def test_attention_cpu_result_does_not_depend_on_the_thread_count(shape):
    q, k_cache, v_cache, lengths = make_cache(shape, torch.float32, "cpu")
    results = at_thread_counts(lambda: decode_attention(q, k_cache, v_cache, lengths))
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_attention_rejects_lengths_outside_the_cache():
    q, k_cache, v_cache, _ = make_cache((2, 3, 2, 2, 8, 10), torch.float32, "cpu")
    for lengths in ([10, 2], [11, 5]):  # fewer than Sq tokens, more than T_max
        with pytest.raises(ValueError, match="out of range"):
            decode_attention(q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_out_of_range_lengths_are_named_alike_by_every_backend(backend):
    """Found by a new-user trial: the reference and Triton backends said "rows need slots [-2, 40)"
    where the native op names the row, its length and the range it must lie in."""
    if backend == "triton" and not (HAS_TRITON and TRITON_DEVICE == "cpu"):
        pytest.skip("these are CPU tensors: Triton runs them under TRITON_INTERPRET=1 only")
    q, k_cache, v_cache, _ = make_cache((2, 2, 2, 2, 8, 10), torch.float32, "cpu")
    with pytest.raises(ValueError, match=re.escape("cache_seqlens[0] = 1 is out of range: it counts the cached "
                                                   "tokens including the 2 new ones, so it must lie in [2, T_max = "
                                                   "10]")):
        decode_attention(q, k_cache, v_cache, torch.tensor([1, 5], dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match=re.escape("cache_seqlens[1] = 9 is out of range: 2 new tokens need slots "
                                                   "[len, len + 2) inside a cache of T_max = 10")):
        kv_cache_append(k_cache, v_cache, q[:, :, :2], q[:, :, :2], torch.tensor([0, 9], dtype=torch.int32),
                        backend=backend)


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_append_of_nothing_still_checks_the_lengths(backend):
    """Found by a CPU audit: with no tokens to write (S = 0) the native op returned before its
    length check, where the reference raises; every backend raises now."""
    if backend == "triton" and not (HAS_TRITON and TRITON_DEVICE == "cpu"):
        pytest.skip("these are CPU tensors: Triton runs them under TRITON_INTERPRET=1 only")
    k_cache, v_cache, none = torch.zeros(2, 10, 2, 4), torch.zeros(2, 10, 2, 4), torch.zeros(2, 0, 2, 4)
    with pytest.raises(ValueError, match=re.escape("cache_seqlens[1] = 11 is out of range: 0 new tokens need slots")):
        kv_cache_append(k_cache, v_cache, none, none, torch.tensor([0, 11], dtype=torch.int32), backend=backend)
    kv_cache_append(k_cache, v_cache, none, none, torch.tensor([0, 10], dtype=torch.int32), backend=backend)  # fits


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_append_refuses_caches_whose_slots_share_memory(backend):
    """Found by a new-user trial: an expand()ed cache took the append and lost a row's tokens;
    torch's own in-place ops refuse such a tensor."""
    if backend == "triton" and not (HAS_TRITON and TRITON_DEVICE == "cpu"):
        pytest.skip("these are CPU tensors: Triton runs them under TRITON_INTERPRET=1 only")
    k = torch.ones(2, 1, 2, 4)
    lengths = torch.tensor([0, 3], dtype=torch.int32)
    broadcast, own = torch.zeros(1, 10, 2, 4).expand(2, 10, 2, 4), torch.zeros(2, 10, 2, 4)
    with pytest.raises(ValueError, match="k_cache has elements that share memory"):
        kv_cache_append(broadcast, own, k, k, lengths, backend=backend)
    with pytest.raises(ValueError, match="k_cache and v_cache share memory"):
        kv_cache_append(own, own, k, k, lengths, backend=backend)
    buffer = torch.zeros(2, 2, 10, 2, 4)  # two slices of one buffer: fine
    kv_cache_append(buffer[0], buffer[1], k, 2 * k, lengths, backend=backend)
    assert buffer[0, 1, 3].eq(1).all() and buffer[1, 1, 3].eq(2).all()
    # new tokens that are a view of a cache (dense or not) would be read half overwritten
    for view in (own[:, 0:1], own[:1, 2:3].expand(2, 1, 2, 4), own.view(-1)[:16].view(2, 1, 2, 4)):
        with pytest.raises(ValueError, match=r"k overlaps k_cache's memory \(a view of the cache\?\)"):
            kv_cache_append(own, torch.zeros(2, 10, 2, 4), view, k, lengths, backend=backend)
    with pytest.raises(ValueError, match="v overlaps k_cache's memory"):
        kv_cache_append(own, torch.zeros(2, 10, 2, 4), k, own[:, 4:5], lengths, backend=backend)
    kv_cache_append(own, torch.zeros(2, 10, 2, 4), own[:, 4:5].clone(), k, lengths, backend=backend)  # a copy: fine


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_a_nan_key_alone_among_masked_keys_makes_the_row_nan(backend_device):
    """Found by a CPU audit: a max that skips NaN dropped a NaN key whose 32-key tile held no
    other visible key (the output stayed finite); softmax (the reference) gives NaN."""
    backend, device = backend_device
    q, k_cache, v_cache = torch.randn(1, 1, 1, 8), torch.randn(1, 64, 1, 8), torch.randn(1, 64, 1, 8)
    lengths = torch.tensor([33], dtype=torch.int32)
    for nan_key in (32, 5):  # alone in keys [32, 64), then among visible keys
        keys = k_cache.clone()
        keys[0, nan_key] = float("nan")
        out = decode_attention(q.to(device), keys.to(device), v_cache.to(device), lengths.to(device), backend=backend)
        assert out.isnan().all(), (nan_key, out)
        assert reference.decode_attention_ref(q, keys, v_cache, lengths).isnan().all()


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_append_bumps_the_version_counter_and_refuses_inference_caches(backend):
    """Found by an op-level trial: the native append left the caches' version counters alone,
    so a graph that had saved a cache view backpropagated through the appended values (wrong
    gradients, where torch's in-place ops raise), and it wrote into caches made under
    inference_mode outside it (torch refuses)."""
    if backend == "triton" and not (HAS_TRITON and TRITON_DEVICE == "cpu"):
        pytest.skip("these are CPU tensors: Triton runs them under TRITON_INTERPRET=1 only")
    k_cache, v_cache = torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 1, 2)
    q = torch.randn(1, 1, 1, 2, requires_grad=True)
    y = (q * k_cache[:, :1]).sum()
    before = k_cache._version
    kv_cache_append(k_cache, v_cache, torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2),
                    torch.zeros(1, dtype=torch.int32), backend=backend)
    assert k_cache._version > before and v_cache._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    with torch.inference_mode():
        inference_k, inference_v = torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 1, 2)
    with pytest.raises(RuntimeError, match="k_cache is an inference tensor"):
        kv_cache_append(inference_k, inference_v, torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2),
                        torch.zeros(1, dtype=torch.int32), backend=backend)
    with torch.inference_mode():  # inside inference mode: fine
        kv_cache_append(inference_k, inference_v, torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2),
                        torch.zeros(1, dtype=torch.int32), backend=backend)
    assert inference_k[0, 0].eq(1).all()


def test_attention_refuses_scalars_it_would_coerce():
    """Found by a new-user trial: window=2.9 ran as 2 and True as 1, a NaN scale or an infinite
    softcap turned every output into NaN, and D = 0 raised a bare ZeroDivisionError."""
    q, k_cache, v_cache, lengths = make_cache((2, 1, 2, 2, 8, 10), torch.float32, "cpu")
    for window in (2.9, True, "4", torch.tensor(2.9)):
        with pytest.raises(TypeError, match="window must be an int"):
            decode_attention(q, k_cache, v_cache, lengths, window=window)
    with pytest.raises(TypeError, match="softcap must be a finite number, got None"):
        decode_attention(q, k_cache, v_cache, lengths, softcap=None)
    for name, value in (("scale", float("nan")), ("softcap", float("inf")), ("scale", float("-inf"))):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            decode_attention(q, k_cache, v_cache, lengths, **{name: value})
    with pytest.raises(TypeError, match="scale must be a finite number"):
        decode_attention(q, k_cache, v_cache, lengths, scale="0.1")
    with pytest.raises(ValueError, match="head dim D must be >= 1"):
        decode_attention(q[..., :0], k_cache[..., :0], v_cache[..., :0], lengths)
    assert decode_attention(q, k_cache, v_cache, lengths, window=np.int64(4), scale=np.float32(0.2)).shape == q.shape
    assert decode_attention(q, k_cache, v_cache, lengths, scale=torch.tensor(0.2)).shape == q.shape  # as float() takes


def test_eps_checks_leave_compiled_calls_alone():
    """Found by a new-user trial: masked_group_norm (and linear_attention) failed a fullgraph compile
    once eps changed between calls (a symbolic float met math.isfinite)."""
    from mmfast.ops import linear_attention, masked_group_norm

    x, codes, mask = torch.randn(2, 8, 4, 4), torch.tensor([0, 1]), torch.ones(2, 8, dtype=torch.bool)
    torch._dynamo.reset()
    norm = torch.compile(lambda e: masked_group_norm(x, None, None, 4, codes, mask, eps=e), fullgraph=True,
                         backend="eager")
    q = torch.randn(1, 16, 2, 8)
    attend = torch.compile(lambda e: linear_attention(q, q, q, eps=e), fullgraph=True, backend="eager")
    for eps in (1e-5, 1e-3, 1e-2):
        torch.testing.assert_close(norm(eps), masked_group_norm(x, None, None, 4, codes, mask, eps=eps))
        torch.testing.assert_close(attend(eps), linear_attention(q, q, q, eps=eps))


def test_scalar_checks_leave_compiled_calls_alone():
    """Found in review: under torch.compile a second scale or temperature becomes a symbolic float,
    which the scalar checks must not touch (math.isfinite on it failed a fullgraph compile)."""
    q, k_cache, v_cache, lengths = make_cache((2, 1, 2, 2, 8, 10), torch.float32, "cpu")
    torch._dynamo.reset()
    attend = torch.compile(lambda s: decode_attention(q, k_cache, v_cache, lengths, scale=s), fullgraph=True,
                           backend="eager")
    for scale in (0.3, 0.4, 0.5):
        torch.testing.assert_close(attend(scale), decode_attention(q, k_cache, v_cache, lengths, scale=scale))
    logits, uniform = sampler_logits(2, 50, "cpu"), torch.full((2,), 0.5)
    draw = torch.compile(lambda t: sample(logits, temperature=t, uniform=uniform), fullgraph=True, backend="eager")
    for temperature in (0.7, 0.8, 0.9):
        assert torch.equal(draw(temperature), sample(logits, temperature=temperature, uniform=uniform))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_decode_attention_and_linear_are_inference_only(compiled):
    """backward() raises for every float input that requires grad, eager and compiled; a
    grad-mode forward compiles (an op-level trial: AOTAutograd traced the backward ahead and the
    compile itself failed, where eager runs the forward)."""
    q, k_cache, v_cache, lengths = make_cache((2, 1, 2, 2, 8, 6), torch.float32, "cpu")
    lin = torch.nn.Linear(8, 16)

    def step(x, k_cache):
        return decode_attention(lin(x).view(2, 1, 2, 8).contiguous(), k_cache, v_cache, lengths) + \
            decode_linear(x.view(2, 8), lin.weight).view(2, 1, 2, 8)

    run = torch.compile(step, fullgraph=True) if compiled else step
    x = torch.randn(2, 1, 8)
    with torch.no_grad():
        expected = step(x, k_cache)
    torch.testing.assert_close(run(x, k_cache), expected)  # grad mode, lin's weight requires grad
    with pytest.raises(RuntimeError, match="decode_(attention|linear) is inference-only"):
        run(x, k_cache).sum().backward()
    for_cache = k_cache.clone().requires_grad_()  # only a cache requires grad: still refused
    with torch.no_grad():
        lin.weight.requires_grad_(False), lin.bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="decode_attention is inference-only"):
        run(x, for_cache).sum().backward()


# --- sample ---------------------------------------------------------------------------------------


def sampler_logits(rows, vocab, device, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(rows, vocab, generator=generator)).to(device, dtype)


SAMPLER_SETTINGS = [  # temperature, top_k, top_p, cfg_scale
    (1.0, 0, 1.0, None), (0.9, 4096, 0.96, 7.0), (0.7, 50, 0.5, None), (1.3, 0, 0.8, 3.0), (1.0, 1, 1.0, None),
    (0.5, 10, 0.0, None)]


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("vocab", [20000, 8192, 1000, 7])  # 20000: the CPU's top-k prefilter (blocks >= 4 k)
@pytest.mark.parametrize("setting", SAMPLER_SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_sample_matches_the_reference(backend_device, vocab, setting):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and vocab > 1000:
        pytest.skip("slow under the Triton interpreter (tests/test_decode_triton.py covers the Triton sampler)")
    temperature, top_k, top_p, cfg_scale = setting
    logits = sampler_logits(16, vocab, device)
    uniform = torch.rand(8 if cfg_scale else 16, generator=torch.Generator().manual_seed(1)).to(device)
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, uniform=uniform)
    tokens = sample(logits, **kwargs, backend=backend)
    expected = sample(logits.cpu(), **{**kwargs, "uniform": uniform.cpu()}, backend="reference")
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens.cpu(), expected)
    if vocab <= 1000:  # strided logits: a slice of a padded vocabulary, the same tokens
        padded = torch.zeros(logits.shape[0], vocab + 9, device=device, dtype=logits.dtype)
        padded[:, 4:4 + vocab] = logits
        strided = padded[:, 4:4 + vocab]
        assert not strided.is_contiguous()
        assert torch.equal(sample(strided, **kwargs, backend=backend).cpu(), expected)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sample_half_precision_logits(backend_device, dtype):
    backend, device = backend_device
    logits = sampler_logits(8, 8192 if device != "cpu" or backend != "triton" else 1000, device, dtype=dtype)
    uniform = torch.rand(4, generator=torch.Generator().manual_seed(2)).to(device)
    kwargs = dict(temperature=0.9, top_k=4096, top_p=0.96, cfg_scale=7.0, uniform=uniform)
    assert torch.equal(sample(logits, **kwargs, backend=backend).cpu(),
                       sample(logits.cpu(), **{**kwargs, "uniform": uniform.cpu()}, backend="reference"))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_sample_greedy_is_the_argmax_of_the_cfg_mix(backend_device):
    backend, device = backend_device
    logits = sampler_logits(12, 500, device)
    logits[0, 10] = logits[0, 20] = logits[0].max() + 1  # a tie: the lower index wins
    cond, uncond = logits[:6].float(), logits[6:].float()
    expected = (uncond + (cond - uncond) * 2.5).argmax(-1)
    assert torch.equal(sample(logits, temperature=0.0, cfg_scale=2.5, backend=backend), expected)
    ties = torch.zeros(2, 9, device=device)
    assert sample(ties, temperature=0.0, backend=backend).tolist() == [0, 0]


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_sample_cfg_mix_rounds_after_each_operation(backend_device):
    """Found on 2026-12-05: the compiler fused the CPU kernel's (cond - uncond) * scale + uncond into
    an FMA, which moved some mixes by an ulp, and greedy tokens with them. Token 1 of each pair mixes
    to token 0's value when rounded after each operation (torch's separate ops, Liquid's
    expression) and above it when fused: the first index, 0, must win."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(3)
    cond, uncond = 3 * torch.randn(2, 4096, generator=generator)
    rounded = uncond + (cond - uncond) * 2.5
    fused = (uncond.double() + (cond - uncond).double() * 2.5).float()
    pairs = (fused > rounded).nonzero().flatten()[:32]
    assert len(pairs) >= 16  # enough pairs that a fused mix shows
    logits = torch.stack([torch.stack([rounded[pairs], cond[pairs]], 1),
                          torch.stack([rounded[pairs], uncond[pairs]], 1)]).reshape(-1, 2)
    tokens = sample(logits.to(device), temperature=0.0, cfg_scale=2.5, backend=backend)
    assert tokens.tolist() == [0] * len(pairs)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_sample_is_reproducible_with_a_seed(backend_device):
    backend, device = backend_device
    logits = sampler_logits(4, 1000, device)

    def draw(seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return sample(logits, top_k=100, top_p=0.9, generator=generator, backend=backend)

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(torch.stack([draw(s) for s in range(4)]), torch.stack([draw(5)] * 4))


def test_sample_draws_from_the_filtered_distribution():
    """A chi-square test of 20,000 CPU draws of one row against the reference's probabilities."""
    logits = sampler_logits(1, 64, "cpu", seed=4).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    tokens = sample(logits, temperature=0.8, top_k=20, top_p=0.9, generator=generator)
    probs = reference.sample_probs_ref(logits[:1], 0.8, 20, 0.9)[0]
    counts = torch.bincount(tokens, minlength=64).double()
    assert bool((counts[probs == 0] == 0).all()), "a filtered-out token was drawn"
    kept = probs > 0
    expected = probs[kept] * tokens.numel()
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_sample_flags_rows_it_cannot_sample(backend_device):
    backend, device = backend_device
    logits = sampler_logits(5, 300, device)
    logits[1, 7] = float("nan")
    logits[2] = float("-inf")
    logits[3, 0] = float("inf")
    logits[4, :299] = float("-inf")  # one finite entry: fine
    tokens, status = sample(logits, return_status=True, backend=backend)
    assert status.tolist() == [0, 1, 1, 1, 0]
    assert tokens[1:4].tolist() == [0, 0, 0] and tokens[4].item() == 299
    if device == "cpu":
        with pytest.raises(ValueError, match=r"rows \[1, 2, 3\]"):
            sample(logits, backend=backend)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_sample_review_regressions(backend_device):
    """Found in review: -0 and +0 must tie (top-k / top-p keep both); a tiny temperature must not
    overflow x / temperature (raised to 1e-5, as Liquid does); top_p is compared in fp64 on the CPU."""
    backend, device = backend_device
    zeros = torch.tensor([[0.0, -0.0, -1.0]] * 64, device=device)
    tokens = sample(zeros, top_k=1, uniform=torch.linspace(0, 0.999, 64, device=device), backend=backend)
    assert set(tokens.tolist()) == {0, 1}
    peaks = torch.tensor([[1.0, 100.0, 99.0]], device=device)
    assert sample(peaks, temperature=1e-38, uniform=torch.tensor([0.5], device=device), backend=backend).item() == 1
    if backend == "native" and device == "cpu":
        boundary = torch.tensor([[0.0, -2.1972244]])  # probabilities 0.9 and 0.1: the first alone reaches 0.9
        assert sample(boundary, top_p=0.9, uniform=torch.tensor([0.95])).item() == \
            sample(boundary, top_p=0.9, uniform=torch.tensor([0.95]), backend="reference").item()


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_sample_target_on_a_running_sum_takes_the_next_token(backend_device):
    """decode.h: the smallest i whose running sum of kept weights exceeds u * total. With 6 tied
    tokens and u = 0.5 the target 3 equals the third running sum: token 3. The reference drew from
    normalised probabilities (total 0.9999999999999999) and returned 2."""
    backend, device = backend_device
    for vocab, expected in ((6, [0, 1, 3, 4]), (4, [0, 1, 2, 3])):  # u * total: 0, 1.5, 3, 4.5 / 0, 1, 2, 3
        ties = torch.zeros(4, vocab, device=device)
        uniform = torch.tensor([0.0, 0.25, 0.5, 0.75], device=device)
        for top_k in (0, vocab):
            assert sample(ties, top_k=top_k, uniform=uniform, backend=backend).tolist() == expected
            assert sample(ties.cpu(), top_k=top_k, uniform=uniform.cpu(), backend="reference").tolist() == expected


def test_sample_rejects_scalars_it_would_coerce():
    """Found by a new-user trial: top_k=4.5 was truncated and True read as 1, a NaN cfg_scale was
    blamed on the logits, and a generator next to uniform was silently ignored."""
    logits = sampler_logits(2, 50, "cpu")
    for top_k in (4.5, True, "3"):
        with pytest.raises(TypeError, match="top_k must be an int"):
            sample(logits, top_k=top_k)
    assert sample(logits, top_k=np.int64(3), uniform=torch.zeros(2)).shape == (2,)  # numpy ints are ints
    for name, value in (("temperature", float("inf")), ("top_p", float("nan")), ("cfg_scale", float("nan"))):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            sample(logits, **{name: value})
    with pytest.raises(ValueError, match="either uniform .* or generator"):
        sample(logits, uniform=torch.zeros(2), generator=torch.Generator())
    for bad in (1.5, 1.0, -0.1, float("nan")):  # a new-user trial drew the last token from u = 1.5
        with pytest.raises(ValueError, match=r"uniform must hold numbers in \[0, 1\)"):
            sample(logits, uniform=torch.tensor([0.5, bad]))
    # greedy never reads u (generate_text passes zeros): no check, no host synchronisation per step
    assert sample(logits, temperature=0.0, uniform=torch.tensor([0.5, 1.5])).shape == (2,)
    # an op-level trial: greedy drew from the global generator (transformers' greedy does not),
    # and a float64 uniform raised ValueError where a dtype gets TypeError
    state = torch.random.get_rng_state()
    sample(logits, temperature=0.0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for backend in ("native", "reference"):
        with pytest.raises(TypeError, match=r"uniform must be float32 \(2,\).* got torch.float64|got float64"):
            sample(logits, uniform=torch.zeros(2, dtype=torch.float64), backend=backend)
        with pytest.raises(ValueError, match=r"uniform must be float32 \(2,\).* got shape"):
            sample(logits, uniform=torch.zeros(3), backend=backend)


def test_sample_propagates_shapes_under_fake_tensor_mode():
    """An op-level trial: the eager checks that read values (invalid rows, u in [0, 1)) raised
    DataDependentOutputException under FakeTensorMode (shape propagation, export tooling)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.randn(4, 50)
        for kwargs in ({}, {"temperature": 0.0}, {"uniform": torch.rand(4)}, {"cfg_scale": 2.0}):
            assert sample(logits, **kwargs).shape == ((2,) if "cfg_scale" in kwargs else (4,))


def test_sample_with_a_generator_under_torch_compile_says_what_to_do():
    logits = sampler_logits(2, 50, "cpu")
    compiled = torch.compile(lambda x, g: sample(x, generator=g, return_status=True), fullgraph=True,
                             backend="eager")
    with pytest.raises(Exception, match="cannot be traced by torch.compile.*uniform="):
        compiled(logits, torch.Generator())
    by_uniform = torch.compile(lambda x, u: sample(x, uniform=u, return_status=True)[0], fullgraph=True,
                               backend="eager")
    uniform = torch.rand(2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(by_uniform(logits, uniform), sample(logits, uniform=uniform))


def test_sample_u_near_one_stays_in_range():
    logits = torch.full((3, 50), float("-inf"))
    logits[:, 3], logits[:, 40], logits[:, 45] = 0.0, -1.0, -9.0
    tokens = sample(logits, top_k=2, uniform=torch.tensor([0.0, 0.99999994, 0.5]))
    assert tokens.tolist() == [3, 40, 3]


# --- decode_linear ------------------------------------------------------------------------------

LINEAR_SHAPES = [(1, 768, 3072), (1, 100, 7), (8, 768, 2304), (3, 40, 7), (16, 5, 1), (13, 1, 9), (0, 8, 4)]  # M, K, N


@pytest.mark.parametrize("backend_device", [b for b in BACKENDS if "triton" not in b.id])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=shape_id)
def test_linear_matches_the_reference(backend_device, dtype, shape):
    backend, device = backend_device
    if dtype == torch.float64 and device != "cpu":
        pytest.skip("fp64 on the CPU kernels only")
    rows, k, n = shape
    generator = torch.Generator().manual_seed(k)
    x = torch.randn(rows, k, generator=generator).to(device, dtype)
    weight = torch.randn(n, k, generator=generator).to(device, dtype)
    bias = torch.randn(n, generator=generator).to(device, dtype)
    for b in (None, bias):
        out = decode_linear(x, weight, b, backend=backend)
        expected = reference.decode_linear_ref(x, weight, b)
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(out.double(), expected.double(), atol=atol * k ** 0.5, rtol=rtol)


def test_linear_takes_token_tensors_and_strided_rows():
    x = torch.randn(2, 3, 64)[:, :, ::2]  # (B, S, K) with a stride of 2 along K
    weight = torch.randn(10, 32)
    torch.testing.assert_close(decode_linear(x, weight), torch.nn.functional.linear(x, weight), atol=1e-5, rtol=1e-5)
    rows = torch.randn(64, 4)[::8]  # rows 8 apart
    torch.testing.assert_close(decode_linear(rows, weight[:, :4]), rows @ weight[:, :4].T, atol=1e-5, rtol=1e-5)


def test_linear_errors():
    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must be \(N, K=8\)"):
        decode_linear(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"bias must be \(4,\)"):
        decode_linear(x, weight, torch.randn(5))
    with pytest.raises(TypeError, match="same dtype"):
        decode_linear(x, weight.double())
    with pytest.raises(RuntimeError, match="no Triton twin"):
        decode_linear(x, weight, backend="triton")
    out = decode_linear(x.requires_grad_(), weight)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


# --- torch.library integration --------------------------------------------------------------------


@pytest.mark.parametrize("backend_device", [p for p in BACKENDS if p.values[0][0] == "native"])
def test_opcheck(backend_device):  # the Triton ops': tests/test_decode_triton.py::test_opcheck
    backend, device = backend_device
    import mmfast._backend as _backend
    op = lambda name: _backend.op_overload(name, backend)  # noqa: E731
    q, k_cache, v_cache, lengths = make_cache((2, 2, 4, 2, 16, 20), torch.float32, device)
    torch.library.opcheck(op("decode_attention"), (q, k_cache, v_cache, lengths, 0.25, 0.0, 0))
    torch.library.opcheck(op("decode_attention"), (q, k_cache, v_cache, lengths, 0.25, 30.0, 5))
    k = torch.randn(2, 3, 2, 16, device=device)
    torch.library.opcheck(op("kv_cache_append"), (k_cache, v_cache, k, k.clone(), (lengths - 3).clamp_min(0)))
    logits = sampler_logits(4, 100, device)
    torch.library.opcheck(op("sample"), (logits, torch.rand(2, device=device), 0.9, 10, 0.9, 3.0))
    torch.library.opcheck(op("sample"), (logits, torch.rand(4, device=device), 0.0, 0, 1.0, None))
    if backend == "native":
        weight = torch.randn(6, 16, device=device)
        torch.library.opcheck(op("decode_linear"), (q[:, 0, 0], weight, torch.randn(6, device=device)))
        torch.library.opcheck(op("decode_linear"), (q[:, 0, 0], weight, None))


def test_torch_compile_fullgraph_decode_step():
    q, k_cache, v_cache, lengths = make_cache((2, 1, 4, 2, 16, 20), torch.float32, "cpu")
    k_new, v_new = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lengths = lengths.clamp_max(19)

    def step(q, k_new, v_new, k_cache, v_cache, lengths, uniform):
        kv_cache_append(k_cache, v_cache, k_new, v_new, lengths)
        out = decode_attention(q, k_cache, v_cache, lengths + 1)
        return sample(out.flatten(1), top_k=5, uniform=uniform, return_status=True)

    uniform = torch.rand(2)
    caches = (k_cache.clone(), v_cache.clone())
    expected = step(q, k_new, v_new, *caches, lengths, uniform)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, k_new, v_new, k_cache, v_cache, lengths, uniform)
    assert torch.equal(got[0], expected[0]) and torch.equal(k_cache, caches[0])


# --- bad inputs -----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    q, k_cache, v_cache, lengths = make_cache((2, 1, 4, 2, 8, 10), torch.float32, "cpu")
    cases = [
        (lambda: kv_cache_append(k_cache, v_cache, q, q, [3, 5]), TypeError, "cache_seqlens must be a torch.Tensor"),
        (lambda: decode_attention(q.tolist(), k_cache, v_cache, lengths), TypeError, "q must be a torch.Tensor"),
        (lambda: sample([[0.0, 1.0]]), TypeError, "logits must be a torch.Tensor"),
        (lambda: decode_linear(q, [1.0]), TypeError, "weight must be a torch.Tensor"),
        (lambda: decode_attention(q[:, :, :3], k_cache, v_cache, lengths), ValueError, "multiple of the KV heads"),
        (lambda: decode_attention(q, k_cache, v_cache, lengths.long()), TypeError, "int32"),
        (lambda: decode_attention(q, k_cache, v_cache, lengths[:1]), ValueError, r"must be \(2,\)"),
        (lambda: decode_attention(q.double(), k_cache, v_cache, lengths), TypeError, "same dtype"),
        (lambda: decode_attention(q, k_cache, v_cache.half(), lengths), TypeError, "same dtype"),
        (lambda: decode_attention(q.expand(2, 17, 4, 8), k_cache, v_cache, lengths), ValueError, "1 to 16"),
        (lambda: decode_attention(q[..., :4], k_cache, v_cache, lengths), ValueError, "D=8"),
        (lambda: decode_attention(q.expand(2, 11, 4, 8), k_cache, v_cache, lengths), ValueError,
         "11 new tokens do not fit a cache of T_max = 10"),
        (lambda: decode_attention(q, k_cache[:, :0], v_cache[:, :0], lengths), ValueError,
         "1 new tokens do not fit a cache of T_max = 0"),  # no length is valid (CUDA: once a launch error)
        (lambda: decode_attention(q, k_cache[:, :0], v_cache[:, :0], lengths, backend="reference"), ValueError,
         "1 new tokens do not fit a cache of T_max = 0"),  # the Python check (Triton, reference, fakes)
        (lambda: decode_attention(q, k_cache, v_cache[:, :9], lengths), ValueError, "same shape"),
        (lambda: decode_attention(q, k_cache.transpose(1, 3), v_cache, lengths), ValueError, "unit stride"),
        (lambda: decode_attention(q, k_cache, v_cache, lengths, softcap=-1.0), ValueError, "softcap"),
        (lambda: decode_attention(q.int(), k_cache, v_cache, lengths), TypeError, "q must be float32"),
        (lambda: kv_cache_append(k_cache, v_cache, torch.zeros(2, 11, 2, 8), torch.zeros(2, 11, 2, 8), lengths),
         ValueError, "11 new tokens do not fit"),
        (lambda: kv_cache_append(k_cache, v_cache, q, q, lengths), ValueError, "H_kv=2"),
        (lambda: kv_cache_append(k_cache, v_cache, q[:, :, :2].double(), q[:, :, :2], lengths), TypeError,
         "same dtype, got k_cache: torch.float32, k: torch.float64"),
        (lambda: kv_cache_append(k_cache, v_cache.half(), q[:, :, :2], q[:, :, :2], lengths), TypeError,
         "same dtype, got k_cache: torch.float32, v_cache: torch.float16"),
        (lambda: kv_cache_append(k_cache.int(), v_cache.int(), q[:, :, :2].int(), q[:, :, :2].int(), lengths),
         TypeError, "k_cache must be float32, float16, bfloat16 or float64, got torch.int32"),
        (lambda: kv_cache_append(k_cache[0], v_cache[0], q[:, :, :2], q[:, :, :2], lengths), ValueError,
         r"k_cache must be a 4-D \(B, T_max, H_kv, D\) tensor, got shape \[10, 2, 8\]"),
        (lambda: decode_attention(q.transpose(1, 2), k_cache, v_cache, lengths), ValueError,
         r"multiple of the KV heads .* not SDPA's \(B, H, S, D\)"),  # a head-major q: H = 1, Sq = 4
        (lambda: kv_cache_append(k_cache, v_cache, q.transpose(1, 2), q.transpose(1, 2), lengths), ValueError,
         r"not SDPA's \(B, H, S, D\)"),
        (lambda: kv_cache_append(k_cache, v_cache, q[:, :, :2].clone().requires_grad_(), q[:, :, :2], lengths),
         RuntimeError, "k requires grad, but the cache append is inference-only"),
        (lambda: kv_cache_append(k_cache.clone().requires_grad_(), v_cache, q[:, :, :2], q[:, :, :2], lengths),
         RuntimeError, "k_cache requires grad"),
        (lambda: sample(torch.randn(3, 10), cfg_scale=2.0), ValueError, "even number of rows"),
        (lambda: sample(torch.randn(3, 10), top_p=1.5), ValueError, "top_p"),
        (lambda: sample(torch.randn(3, 10), top_k=-1), ValueError, "top_k"),
        (lambda: sample(torch.randn(3, 10), temperature=-0.1), ValueError, "temperature"),
        (lambda: sample(torch.randn(3, 10), uniform=torch.rand(2)), ValueError, "uniform"),
        (lambda: sample(torch.randn(10)), ValueError, "2-D"),
        (lambda: sample(torch.randn(3, 10), generator="abc"), TypeError,
         r"generator must be a torch.Generator \(or None: the global one\), got str"),
        # past float32's range: the kernels' scaled logits / scores became inf, then NaN (a token drawn
        # from a -inf logit, reported valid; a NaN output), found by a CPU-kernel audit
        (lambda: sample(torch.randn(3, 10), temperature=1e39), ValueError,
         r"temperature must be a finite number within float32's range \(\|x\| <= 3.4028235e\+38"),
        (lambda: torch.ops.mmfast.sample(torch.randn(2, 10), torch.rand(1), 1.0, 0, 1.0, -1e39), ValueError,
         "cfg_scale must be a finite number within float32's range"),
        (lambda: torch.ops.mmfast.sample(torch.randn(2, 10), torch.rand(2), float("inf"), 0, 1.0, None), ValueError,
         "temperature must be a finite number within float32's range"),
        (lambda: decode_attention(q, k_cache, v_cache, lengths, softcap=1e39), ValueError,
         "softcap must be a finite number within float32's range"),
        (lambda: torch.ops.mmfast.decode_attention(q, k_cache, v_cache, lengths, 1e39, 0.0, 0), ValueError,
         "scale must be a finite number within float32's range"),
        (lambda: torch.ops.mmfast.decode_attention(q, k_cache, v_cache, lengths, 0.3, 1e39, 0), ValueError,
         "softcap must be a finite number within float32's range"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    wide = decode_attention(q.double(), k_cache.double(), v_cache.double(), lengths, softcap=1e39)  # fp64 scores
    torch.testing.assert_close(wide, decode_attention(q.double(), k_cache.double(), v_cache.double(), lengths))
    with torch.no_grad():  # grad mode off: the same append is fine, and writes
        kv_cache_append(k_cache, v_cache, q[:, :, :2].clone().requires_grad_(), q[:, :, :2],
                        torch.tensor([3, 5], dtype=torch.int32))
    assert torch.equal(k_cache[0, 3], q[0, 0, :2]) and torch.equal(k_cache[1, 5], q[1, 0, :2])


def test_reference_outputs_are_contiguous_like_the_kernels():
    """The reference backend's decode_attention returns a contiguous tensor whatever q's strides
    (its fake kernel and the compiled ops do)."""
    q, k_cache, v_cache, lengths = make_cache((2, 3, 4, 2, 8, 10), torch.float32, "cpu")
    strided_q = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, head-major memory
    out = decode_attention(strided_q, k_cache, v_cache, lengths, backend="reference")
    assert out.is_contiguous() and torch.equal(out, decode_attention(q, k_cache, v_cache, lengths,
                                                                     backend="reference"))


def test_native_op_checks_inputs_itself():
    """torch.ops.mmfast.* called directly (no Python wrapper) still rejects bad inputs."""
    q, k_cache, v_cache, lengths = make_cache((2, 1, 4, 2, 8, 10), torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        torch.ops.mmfast.decode_attention(q[:, :, :3], k_cache, v_cache, lengths, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="do not fit a cache of T_max = 0"):
        torch.ops.mmfast.decode_attention(q, k_cache[:, :0], v_cache[:, :0], lengths, 1.0, 0.0, 0)
    with pytest.raises(TypeError, match="int32"):
        torch.ops.mmfast.kv_cache_append(k_cache, v_cache, k_cache[:, :1], v_cache[:, :1], lengths.long())
    with pytest.raises(ValueError, match="uniform"):
        torch.ops.mmfast.sample(torch.randn(4, 10), torch.rand(4), 1.0, 0, 1.0, 2.0)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_append_and_sample_name_mixed_devices(backend):
    """kv_cache_append and sample refuse inputs on two devices (a meta tensor beside CPU ones
    here), naming both, before any kernel or write (only decode_attention's was tested)."""
    k_cache, v_cache = torch.zeros(2, 16, 2, 8), torch.zeros(2, 16, 2, 8)
    lengths = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="all inputs must have the same device, got k_cache: cpu, k: meta, v: cpu"):
        kv_cache_append(k_cache, v_cache, torch.zeros(2, 1, 2, 8, device="meta"), torch.zeros(2, 1, 2, 8), lengths,
                        backend=backend)
    assert not k_cache.any() and torch.equal(lengths, torch.tensor([3, 4], dtype=torch.int32))
    with pytest.raises(TypeError, match="all inputs must have the same device, got logits: cpu, uniform: meta"):
        sample(torch.randn(2, 50), uniform=torch.rand(2, device="meta"), backend=backend)
