"""The Triton twins of the decode ops (torch.ops.mmfast_triton.kv_cache_append, decode_attention,
sample) against mmfast.reference.decode: every op and dtype, odd shapes, GQA, Sq 1 and > 1,
window, softcap, per-row lengths, the split-keys combine, the sampler's rules, opcheck and
torch.compile. Without a GPU they run under TRITON_INTERPRET=1 (conftest.py): shapes are small."""
from __future__ import annotations

import pytest
import torch

from mmfast import reference
from mmfast.ops import decode_attention, kv_cache_append, sample

from _utils import HAS_TRITON, TRITON_DEVICE, assert_close

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

DEVICE = TRITON_DEVICE
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def ns():
    import mmfast.triton  # noqa: F401
    return torch.ops.mmfast_triton


@pytest.fixture
def splits(monkeypatch):
    """Sets the attention's number of key splits (1 under the interpreter otherwise)."""
    from mmfast.triton import decode as triton_decode

    def set_splits(n):
        monkeypatch.setattr(triton_decode, "FORCE_SPLITS", n)
    return set_splits


def randn(*shape, dtype=torch.float32, generator=None):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)


def seqlens(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# --- kv_cache_append --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_append_matches_reference_and_skips_rows_that_overflow(ns, dtype):
    batch, max_tokens, kv_heads, dim, new = 6, 11, 3, 5, 3
    k_cache, v_cache = randn(batch, max_tokens, kv_heads, dim, dtype=dtype), randn(batch, max_tokens, kv_heads, dim,
                                                                                   dtype=dtype)
    # k, v non-contiguous (heads and tokens swapped in memory, a stride-2 D).
    k = randn(batch, kv_heads, new, 2 * dim, dtype=dtype).transpose(1, 2)[..., ::2]
    v = randn(batch, kv_heads, new, dim, dtype=dtype).transpose(1, 2)
    lens = [0, 4, max_tokens - new, max_tokens - new + 1, -1, 2**31 - 2]  # rows 3 to 5 do not fit
    got_k, got_v = k_cache.clone(), v_cache.clone()
    ns.kv_cache_append(got_k, got_v, k, v, seqlens(lens))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.kv_cache_append_ref(want_k[:3], want_v[:3], k[:3], v[:3], seqlens(lens[:3]))
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)  # exact, and rows 3 to 5 untouched


def test_append_into_a_strided_cache_view_and_public_api():
    # A cache that is a view (every other head of a bigger buffer): unit stride along D only.
    buffer = randn(2, 9, 4, 16)
    k_cache, v_cache = buffer[:, :, ::2], buffer.clone()[:, :, 1::2]
    k, v = randn(2, 1, 2, 16), randn(2, 1, 2, 16)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.kv_cache_append_ref(want_k, want_v, k, v, seqlens([8, 3]))
    before = buffer[:, :, 1::2].clone()
    kv_cache_append(k_cache, v_cache, k, v, seqlens([8, 3]), backend="triton")
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert torch.equal(buffer[:, :, 1::2], before)  # the other heads of the buffer untouched


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter on CPU tensors: on CUDA the rows are skipped / NaN")
def test_public_api_on_cpu_tensors_raises_for_lengths_out_of_range():
    """On CPU tensors the Triton backend raises for out-of-range lengths as the native CPU op does
    (the wrapper checks them; the kernels themselves skip such rows, as on CUDA)."""
    k_cache, v_cache, k = randn(2, 8, 1, 4), randn(2, 8, 1, 4), randn(2, 2, 1, 4)
    before = k_cache.clone()
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 7 is out of range: 2 new tokens need slots"):
        kv_cache_append(k_cache, v_cache, k, k, seqlens([0, 7]), backend="triton")
    assert torch.equal(k_cache, before)  # nothing written, not even row 0
    with pytest.raises(ValueError, match="out of range"):
        decode_attention(randn(2, 2, 1, 4), k_cache, v_cache, seqlens([1, 9]), backend="triton")


# --- decode_attention -------------------------------------------------------------------------


def check_attention(ns, q, k_cache, v_cache, lens, scale=None, softcap=0.0, window=0, tol_scale=1.0):
    """The op against the fp64 reference on the rows whose length is valid; NaN on the others."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = ns.decode_attention(q, k_cache, v_cache, seqlens(lens), scale, softcap, window)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    queries, max_tokens = q.shape[1], k_cache.shape[1]
    ok = [queries <= n <= max_tokens for n in lens]
    rows = [b for b, good in enumerate(ok) if good]
    if rows:
        want = reference.decode_attention_ref(q[rows], k_cache[rows], v_cache[rows], seqlens(lens)[rows], scale,
                                              softcap, window)
        assert_close(out[rows], want, q.dtype, tol_scale)
    bad = [b for b, good in enumerate(ok) if not good]
    assert bool(out[bad].isnan().all())
    return out


# (B, T_max, H, H_kv, D, Sq, lengths): MHA, GQA, MQA, odd D, Sq 1 and > 1, lengths Sq and T_max.
ATTENTION_CASES = {
    "gqa-decode": (3, 37, 6, 2, 24, 1, [1, 37, 20]),
    "mha-chunk": (2, 33, 2, 2, 16, 4, [4, 33]),
    "mqa-odd-d": (2, 29, 3, 1, 7, 3, [29, 3]),
    "spec-16": (1, 40, 4, 4, 8, 16, [40]),
    "d1": (2, 18, 2, 1, 1, 2, [2, 17]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_reference(ns, case, dtype):
    batch, max_tokens, heads, kv_heads, dim, queries, lens = ATTENTION_CASES[case]
    q = randn(batch, queries, heads, dim, dtype=dtype)
    k_cache, v_cache = (randn(batch, max_tokens, kv_heads, dim, dtype=dtype) for _ in range(2))
    check_attention(ns, q, k_cache, v_cache, lens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_window_softcap_and_split_keys(ns, splits, dtype):
    q = randn(2, 3, 4, 40, dtype=dtype) * 2
    k_cache, v_cache = (randn(2, 45, 2, 40, dtype=dtype) for _ in range(2))
    # 1 split: the direct path; 3: more splits than key tiles for the short row.
    for n, softcap, window in [(1, 0.0, 5), (3, 3.0, 0), (2, 2.5, 19), (7, 50.0, 1)]:
        splits(n)
        check_attention(ns, q, k_cache, v_cache, [45, 9], scale=0.3, softcap=softcap, window=window, tol_scale=2.0)


def test_attention_invalid_lengths_give_nan_rows(ns, splits):
    q = randn(5, 2, 2, 8)
    k_cache, v_cache = randn(5, 12, 1, 8), randn(5, 12, 1, 8)
    lens = [2, 1, 13, -5, 12]  # rows 1 to 3 outside [Sq, T_max]
    check_attention(ns, q, k_cache, v_cache, lens)
    splits(2)
    check_attention(ns, q, k_cache, v_cache, lens)


def test_attention_many_query_rows_non_contiguous_q(ns, splits):
    # G * Sq = 5 * 16 = 80 rows of a group: several row tiles; q with heads and tokens swapped in memory.
    q = randn(1, 10, 16, 16).transpose(1, 2)
    k_cache, v_cache = randn(1, 24, 2, 16), randn(1, 24, 2, 16)
    check_attention(ns, q, k_cache, v_cache, [21], window=9)
    splits(2)
    check_attention(ns, q, k_cache, v_cache, [24])


def test_attention_public_api_decode_step():
    """Append then attend through the public API: the new token attends itself."""
    k_cache, v_cache = torch.zeros(2, 8, 1, 16, device=DEVICE), torch.zeros(2, 8, 1, 16, device=DEVICE)
    lens = seqlens([0, 5])
    k, v, q = randn(2, 1, 1, 16), randn(2, 1, 1, 16), randn(2, 1, 2, 16)
    kv_cache_append(k_cache, v_cache, k, v, lens, backend="triton")
    out = decode_attention(q, k_cache, v_cache, lens + 1, window=3, backend="triton")
    want = decode_attention(q, k_cache, v_cache, lens + 1, window=3, backend="reference")
    assert_close(out, want, torch.float32)
    assert_close(out[0], v[0].expand(1, 2, 16), torch.float32)  # row 0: one key, itself


def test_attention_backward_raises_and_fp64_and_wide_heads_are_rejected(ns):
    q = randn(1, 1, 1, 4).requires_grad_()
    caches = randn(1, 3, 1, 4), randn(1, 3, 1, 4)
    out = ns.decode_attention(q, *caches, seqlens([2]), 0.5, 0.0, 0)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()
    with pytest.raises(TypeError, match="no float64 kernels"):
        ns.decode_attention(q.detach().double(), *(c.double() for c in caches), seqlens([2]), 0.5, 0.0, 0)
    with pytest.raises(ValueError, match="head dims up to 256 are supported, got D = 512"):
        ns.decode_attention(randn(1, 1, 1, 512), randn(1, 3, 1, 512), randn(1, 3, 1, 512), seqlens([2]), 0.5, 0.0, 0)


# --- sample -----------------------------------------------------------------------------------


def check_draws(tokens, status, logits, uniform, temperature, top_k, top_p, cfg_scale=None, slack=1e-5):
    """Tokens within the reference's distribution: equal to sample_ref's where u is clear of the
    fp64 CDF's steps by `slack` (the kernel sums in fp32), else one of the two tokens around it."""
    probs = reference.sample_probs_ref(logits, temperature, top_k, top_p, cfg_scale).cpu()
    want = reference.sample_ref(logits, uniform, temperature, top_k, top_p, cfg_scale).cpu()
    invalid = probs.isnan().any(-1)
    assert torch.equal(status.cpu(), invalid.int())
    tokens, uniform = tokens.cpu(), uniform.cpu().double()
    assert tokens.dtype == torch.int64
    assert bool((tokens[invalid] == 0).all())
    for r in (~invalid).nonzero().flatten().tolist():
        t = int(tokens[r])
        assert 0 <= t < probs.shape[1] and probs[r, t] > 0, (r, t)
        cdf = probs[r].cumsum(0)
        clear = bool(((cdf - uniform[r]).abs() > slack).all())
        if clear:
            assert t == int(want[r]), (r, t, int(want[r]))
        else:
            assert cdf[t] >= uniform[r] - slack and cdf[t] - probs[r, t] <= uniform[r] + slack


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 40, 1.0), (1.3, 0, 0.8),
                                                       (0.5, 25, 0.6), (2.0, 1, 0.3)])
def test_sample_matches_reference(ns, dtype, temperature, top_k, top_p):
    logits = (randn(4, 300) * 3).to(dtype)
    uniform = torch.rand(4, device=DEVICE)
    tokens, status = ns.sample(logits, uniform, temperature, top_k, top_p, None)
    check_draws(tokens, status, logits, uniform, temperature, top_k, top_p)


def test_scalars_past_float32_are_refused_like_the_native_op(ns):
    logits, uniform = randn(2, 10), torch.rand(2, device=DEVICE)
    with pytest.raises(ValueError, match="temperature must be a finite number within float32's range"):
        ns.sample(logits, uniform, 1e39, 0, 1.0, None)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number within float32's range"):
        ns.sample(logits, uniform[:1], 1.0, 0, 1.0, 1e39)
    q, k_cache = randn(1, 1, 2, 8), randn(1, 4, 2, 8)
    lengths = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    for scale, softcap, name in ((1e39, 0.0, "scale"), (0.3, 1e39, "softcap")):
        with pytest.raises(ValueError, match=f"{name} must be a finite number within float32's range"):
            ns.decode_attention(q, k_cache, k_cache, lengths, scale, softcap, 0)


def test_sample_raises_tiny_temperatures_to_the_minimum_like_the_native_op(ns):
    """Found by a Triton audit: the native glue raises a temperature in (0, 1e-5) to 1e-5, the
    Triton op divided by it as given (token 1 here instead of 0)."""
    logits = torch.tensor([[0.0, 2e-6]], device=DEVICE)
    uniform = torch.tensor([0.3], device=DEVICE)
    tokens, status = ns.sample(logits, uniform, 1e-7, 0, 1.0, None)
    want = reference.sample_ref(logits.cpu(), uniform.cpu(), 1e-5)
    assert tokens.tolist() == want.tolist() == [0] and status.tolist() == [0]
    if torch.ops.mmfast.sample.default.has_kernel_for_dispatch_key("CPU"):
        assert torch.ops.mmfast.sample(logits.cpu(), uniform.cpu(), 1e-7, 0, 1.0, None)[0].tolist() == [0]


def test_sample_greedy_picks_the_lowest_index_of_ties(ns):
    logits = torch.zeros(3, 2100, device=DEVICE)
    logits[0, [5, 1500, 2099]] = 7.0  # ties across chunks of the vocabulary
    logits[1, [2054, 1030]] = 2.0  # the same lane of two chunks
    logits[2] = float("-inf")
    logits[2, [1900, 1901]] = -1e30
    tokens, status = ns.sample(logits, torch.rand(3, device=DEVICE), 0.0, 5, 0.5, None)
    assert tokens.tolist() == [5, 1030, 1900] and status.tolist() == [0, 0, 0]


def test_sample_ties_at_the_top_k_and_top_p_thresholds_are_kept(ns):
    """Integer logits (many exact ties), each row sampled at a grid of u: every token drawn is
    in the reference's support, and u -> 1 reaches its last token."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (2, 1100), generator=generator).float().to(DEVICE)  # two chunks of 1024
    base[1, 1000:] = float("-inf")
    us = torch.tensor([0.0, 0.61, 1 - 2**-24], device=DEVICE)
    logits = base.repeat_interleave(len(us), 0)
    uniform = us.repeat(base.shape[0])
    for temperature, top_k, top_p in [(1.0, 7, 1.0), (0.8, 250, 0.35), (1.0, 0, 0.0), (1.0, 1099, 0.999)]:
        tokens, status = ns.sample(logits, uniform, temperature, top_k, top_p, None)
        check_draws(tokens, status, logits, uniform, temperature, top_k, top_p)
        probs = reference.sample_probs_ref(logits, temperature, top_k, top_p).cpu()
        last = probs.shape[1] - 1 - (probs > 0).flip(-1).long().argmax(-1)
        last_u = len(us) - 1
        assert torch.equal(tokens.cpu()[last_u::len(us)], last[last_u::len(us)])
        first = (probs > 0).long().argmax(-1)
        assert torch.equal(tokens.cpu()[::len(us)], first[::len(us)])  # u = 0: the first kept token


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter, on the NaN rows
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sample_cfg_and_invalid_rows(ns, dtype):
    cond, uncond = randn(5, 257) * 2, randn(5, 257) * 2
    cond[1, 7] = float("nan")  # a NaN in the conditional row only
    uncond[2, 100] = float("inf")
    cond[3], uncond[3] = float("-inf"), float("-inf")  # all -inf after the mix
    uncond[4, :200] = -1e4  # (a -inf entry would mix into NaN: -inf + (c + inf) * 3)
    logits = torch.cat([cond, uncond]).to(dtype)
    uniform = torch.rand(5, device=DEVICE)
    for temperature, top_k, top_p in [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.9, 30, 0.7)]:
        tokens, status = ns.sample(logits, uniform, temperature, top_k, top_p, 3.0)
        assert status.tolist() == [0, 1, 1, 1, 0]
        check_draws(tokens, status, logits, uniform, temperature, top_k, top_p, cfg_scale=3.0)
    greedy, _ = ns.sample(logits, uniform, 0.0, 0, 1.0, 3.0)  # the mix is bit-exact: argmax equal
    want = reference.sample_ref(logits, uniform, 0.0, 0, 1.0, 3.0)
    assert torch.equal(greedy.cpu(), want.cpu())


def test_sample_public_api_and_edge_rows(ns):
    logits = randn(3, 50)
    generator = torch.Generator(device=DEVICE).manual_seed(7)
    tokens, status = sample(logits, temperature=0.8, top_k=5, generator=generator, return_status=True,
                            backend="triton")
    uniform = torch.rand(3, generator=torch.Generator(device=DEVICE).manual_seed(7), device=DEVICE)
    check_draws(tokens, status, logits, uniform, 0.8, 5, 1.0)
    one = randn(2, 1)  # V = 1
    assert ns.sample(one, torch.rand(2, device=DEVICE), 1.0, 0, 0.5, None)[0].tolist() == [0, 0]
    none = ns.sample(randn(0, 5), torch.empty(0, device=DEVICE), 1.0, 0, 1.0, None)
    assert none[0].shape == (0,) and none[1].dtype == torch.int32


# --- torch.library integration ----------------------------------------------------------------


def test_opcheck(ns):
    k_cache, v_cache = randn(2, 9, 2, 8), randn(2, 9, 2, 8)
    k, v = randn(2, 2, 2, 8), randn(2, 2, 2, 8)
    torch.library.opcheck(ns.kv_cache_append.default, (k_cache, v_cache, k, v, seqlens([0, 7])))
    q = randn(2, 2, 4, 8)
    torch.library.opcheck(ns.decode_attention.default, (q, k_cache, v_cache, seqlens([2, 9]), 0.3, 0.0, 0))
    torch.library.opcheck(ns.decode_attention.default,
                          (q.requires_grad_(), k_cache, v_cache, seqlens([5, 3]), 0.3, 2.0, 2),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    logits = randn(4, 40)
    torch.library.opcheck(ns.sample.default, (logits, torch.rand(4, device=DEVICE), 0.9, 5, 1.0, None))
    torch.library.opcheck(ns.sample.default, (logits, torch.rand(2, device=DEVICE), 1.0, 0, 1.0, 2.5))


def test_torch_compile_fullgraph_decode_step():
    torch._dynamo.reset()

    def step(q, k, v, k_cache, v_cache, lens, head, uniform):
        kv_cache_append(k_cache, v_cache, k, v, lens, backend="triton")
        out = decode_attention(q, k_cache, v_cache, lens + k.shape[1], softcap=5.0, backend="triton")
        logits = out[:, -1].flatten(1) @ head  # (2, 64) @ (64, 40): one CFG pair's rows
        return out, sample(logits, temperature=0.8, top_k=7, top_p=0.9, cfg_scale=3.0, uniform=uniform, backend="triton")

    q, k, v = randn(2, 2, 4, 16), randn(2, 2, 2, 16), randn(2, 2, 2, 16)
    caches = randn(2, 10, 2, 16), randn(2, 10, 2, 16)
    lens, head, uniform = seqlens([3, 8]), randn(64, 40), torch.rand(1, device=DEVICE)
    eager_caches = [c.clone() for c in caches]
    want = step(q, k, v, *eager_caches, lens, head, uniform)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, *caches, lens, head, uniform)
    torch.testing.assert_close(got, want)
    assert all(torch.equal(a, b) for a, b in zip(caches, eager_caches))
