"""CUDA-only tests of the decode kernels (kv_cache_append, decode_attention, sample): run on a
machine with an NVIDIA GPU (`make gpu-check`); skipped elsewhere (the host emulator,
tests/cuda_emulator/test_decode_emulated.cpp, covers the kernels in CI)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmfast import reference
from mmfast.ops import decode_attention, kv_cache_append, sample

from _utils import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _caches(b, t_max, h_kv, d, dtype, lengths):
    k_cache = torch.randn(b, t_max, h_kv, d, dtype=dtype, device="cuda")
    v_cache = torch.randn(b, t_max, h_kv, d, dtype=dtype, device="cuda")
    for row, length in enumerate(lengths):  # NaN past each valid length: a read there would show
        if 0 <= length <= t_max:
            k_cache[row, length:] = float("nan")
            v_cache[row, length:] = float("nan")
    return k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32, device="cuda")


def _f32(x: float) -> float:
    """The kernels take scale and softcap as fp32: the reference gets the same value."""
    return float(torch.tensor(x, dtype=torch.float32))


def _check_attention(b, sq, h, h_kv, d, t_max, lengths, dtype, window=0, softcap=0.0):
    q = torch.randn(b, sq, h, d, dtype=dtype, device="cuda")
    k_cache, v_cache, seqlens = _caches(b, t_max, h_kv, d, dtype, lengths)
    scale = _f32(d ** -0.5)
    out = decode_attention(q, k_cache, v_cache, seqlens, scale=scale, softcap=_f32(softcap), window=window,
                           backend="native")
    assert out.shape == q.shape and out.dtype == dtype
    valid = [sq <= length <= t_max for length in lengths]
    for row, ok in enumerate(valid):
        if not ok:
            assert out[row].isnan().all(), f"row {row} (length {lengths[row]}) is not NaN"
    rows = [row for row, ok in enumerate(valid) if ok]
    if rows:
        idx = torch.tensor(rows, device="cuda")
        expected = reference.decode_attention_ref(q[idx], k_cache[idx], v_cache[idx], seqlens[idx], scale,
                                                  _f32(softcap), window)
        assert_close(out[idx], expected, dtype, scale=2)
    return out


def _check_sample(logits, uniform, temperature, top_k, top_p, cfg_scale=None):
    tokens, status = sample(logits, uniform=uniform, temperature=temperature, top_k=top_k, top_p=top_p,
                            cfg_scale=cfg_scale, return_status=True, backend="native")
    rows, vocab = uniform.shape[0], logits.shape[1]
    assert tokens.shape == (rows,) and tokens.dtype == torch.int64 and status.dtype == torch.int32
    assert bool(((tokens >= 0) & (tokens < vocab)).all())
    want_status = reference.invalid_logit_rows(reference.cfg_mix_ref(logits.cpu(), cfg_scale)).int()
    torch.testing.assert_close(status.cpu(), want_status)
    want = reference.sample_ref(logits.cpu(), uniform.cpu(), temperature, top_k, top_p, cfg_scale)
    probs = reference.sample_probs_ref(logits.cpu(), temperature, top_k, top_p, cfg_scale)
    for row in range(rows):
        if want_status[row]:
            assert tokens[row].item() == 0
        elif tokens[row].item() != want[row].item():
            # only where u * total lies within rounding of a CDF step (fp32 exp, fixed-point sums)
            got, expected = tokens[row].item(), want[row].item()
            cdf = probs[row].cumsum(0)
            lo, hi = sorted((got, expected))
            assert probs[row, got] > 0, f"row {row}: token {got} was filtered out"
            assert (cdf[lo:hi + 1] - uniform[row].item()).abs().min() < 1e-4, f"row {row}: {got} vs {expected}"
    return tokens, status


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_smoke_every_op_dtype_and_odd_shape(dtype):
    """Every op, dtype and odd shape once against mmfast.reference.decode: the subset
    `make gpu-check` also runs under compute-sanitizer (memcheck, racecheck)."""
    # kv_cache_append: strided new tokens, a row that would overflow (skipped), a negative length.
    k_cache, v_cache = (torch.randn(4, 9, 3, 40, dtype=dtype, device="cuda") for _ in range(2))
    k, v = (torch.randn(4, 3, 3, 40, dtype=dtype, device="cuda").transpose(1, 2) for _ in range(2))  # (B, S, H, D)
    seqlens = torch.tensor([0, 6, 7, -1], dtype=torch.int32, device="cuda")
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.kv_cache_append_ref(want_k[:2], want_v[:2], k[:2], v[:2], seqlens[:2])
    kv_cache_append(k_cache, v_cache, k, v, seqlens, backend="native")
    torch.testing.assert_close(k_cache, want_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0)
    # decode_attention: Sq 1 / 3 / 16, GQA 1 / 4 / 8, D 64 / 40 / 128 / 256, window, softcap, bad lengths.
    _check_attention(2, 1, 4, 4, 64, 300, [300, 1], dtype)
    _check_attention(2, 3, 8, 2, 40, 257, [77, 3], dtype, window=20, softcap=5.0)
    _check_attention(1, 16, 8, 1, 128, 200, [200], dtype)
    _check_attention(3, 1, 16, 2, 256, 1000, [1000, 64, 1], dtype, softcap=30.0)
    _check_attention(4, 3, 4, 2, 64, 100, [-5, 2, 101, 100], dtype)
    # sample: CFG, filters, invalid rows (fp64 logits are converted to fp32 like the reference).
    logits = torch.randn(6, 1003, device="cuda").mul(3).to(dtype)
    logits[1, 5] = float("nan")
    logits[2] = float("-inf")
    uniform = torch.rand(6, device="cuda")
    uniform[3] = 1 - 2 ** -24
    for temperature, top_k, top_p in [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 50, 0.9), (1.3, 0, 0.5), (1.0, 1, 0.0)]:
        _check_sample(logits, uniform, temperature, top_k, top_p)
    _check_sample(logits, uniform[:3], 1.0, 20, 0.95, cfg_scale=3.0)
    # the cluster-split sampler (V / 2 >= 512 per block): memcheck sees it too
    wide = torch.randn(4, 8192, device="cuda").mul(3).to(dtype)
    _check_sample(wide, torch.rand(4, device="cuda"), 0.9, 0, 0.95)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, heads, kv_heads", [(torch.bfloat16, 4, 4), (torch.float16, 8, 2),
                                                    (torch.bfloat16, 16, 2), (torch.float32, 4, 4)])
@pytest.mark.parametrize("window", [0, 1])
def test_cuda_attention_passes_a_nan_key_on_across_splits(dtype, heads, kv_heads, window):
    """A NaN key makes every query that sees it NaN, as softmax does (found in the emulator: a
    split whose sum was NaN wrote no partial, and the stream kernel's group merge skipped a group
    that saw only the NaN key). Long rows: many splits; the stream kernel (16-bit, G <= 4) and the
    tiled one (G = 8, fp32); window 1: the NaN key alone among the visible ones."""
    q = torch.randn(2, 1, heads, 128, dtype=dtype, device="cuda")
    k_cache, v_cache, seqlens = _caches(2, 8192, kv_heads, 128, dtype, [8192, 3000])
    k_cache[0, 8191 if window else 5000, 0, 0] = float("nan")  # row 0, KV head 0: its group of query heads
    out = decode_attention(q, k_cache, v_cache, seqlens, window=window, backend="native")
    expected = reference.decode_attention_ref(q, k_cache, v_cache, seqlens, None, 0.0, window)
    group = heads // kv_heads
    assert out[0, :, :group].isnan().all() and torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert_close(out[finite], expected[finite], dtype, scale=2)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_cuda_attention_head_dims_and_groups(head_dim, group):
    """Long rows (many splits) and short ones (one split) of the tuned head dims."""
    _check_attention(2, 1, 2 * group, 2, head_dim, 8192, [8192, 513], torch.bfloat16)
    _check_attention(1, 1, group, 1, head_dim, 100, [37], torch.float16)


@pytest.mark.cuda
def test_cuda_attention_head_dim_above_256_raises():
    q = torch.randn(1, 1, 1, 288, device="cuda")
    k_cache = torch.randn(1, 8, 1, 288, device="cuda")
    seqlens = torch.tensor([4], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="256"):
        decode_attention(q, k_cache, k_cache, seqlens, backend="native")


@pytest.mark.cuda
def test_cuda_attention_agrees_with_the_cpu_kernel():
    q = torch.randn(3, 2, 8, 128, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(3, 600, 2, 128, dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([600, 2, 333], dtype=torch.int32)
    cpu = decode_attention(q, k_cache, v_cache, seqlens, window=128, softcap=50.0, backend="native")
    gpu = decode_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), seqlens.cuda(), window=128, softcap=50.0,
                           backend="native")
    assert_close(gpu.cpu(), cpu, torch.bfloat16, scale=2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_results_are_bitwise_identical_run_to_run(dtype):
    """Splits merged in a fixed order; sampler sums exact (fixed point): no run-to-run drift."""
    q = torch.randn(2, 1, 32, 128, dtype=dtype, device="cuda")
    k_cache, v_cache, seqlens = _caches(2, 16384, 8, 128, dtype, [16384, 9000])
    a = decode_attention(q, k_cache, v_cache, seqlens, backend="native")
    b = decode_attention(q, k_cache, v_cache, seqlens, backend="native")
    assert torch.equal(a, b)
    logits = torch.randn(64, 152064, device="cuda").mul(4).to(dtype)
    uniform = torch.rand(64, device="cuda")
    first = sample(logits, uniform=uniform, temperature=0.9, top_k=0, top_p=0.95, backend="native")
    for _ in range(3):
        assert torch.equal(sample(logits, uniform=uniform, temperature=0.9, top_k=0, top_p=0.95, backend="native"),
                           first)


@pytest.mark.cuda
def test_cuda_sample_large_vocab_against_the_reference():
    """Liquid's vocabulary size: radix select over many chunks, top-k ties, top-p, CFG."""
    logits = torch.randn(8, 65536 + 8192, device="cuda") * 5
    logits[:, 100:110] = logits[:, 100:101]  # ties
    uniform = torch.rand(4, device="cuda")
    _check_sample(logits, uniform, 1.0, 4096, 0.96, cfg_scale=4.0)
    _check_sample(logits[:4], uniform, 0.5, 0, 0.8)
    _check_sample(logits[:4], uniform, 1.0, 7, 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [8192, 50257, 264192])
def test_cuda_sample_in_clusters_is_the_one_block_kernel(vocab, tmp_path):
    """On sm_90 a few rows are split over thread-block clusters (sample_cluster_kernel: Liquid's
    image rows, V = 8192 with CFG over 4 pairs, and its whole vocabulary; GPT-2's 50,257, whose
    blocks' slices are uneven, the last one short): the same exact integer sums as one block per
    row (MMFAST_CUDA_SAMPLE_CLUSTERS=0, in a subprocess), so the same tokens, bit for bit, and the
    reference's up to rounding. A NaN row and an all -inf row ride along: every block of their
    cluster must agree they are invalid (status 1, token 0) while the other rows sample."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    if os.environ.get("MMFAST_CUDA_SAMPLE_CLUSTERS", "")[:1] == "0":
        pytest.skip("MMFAST_CUDA_SAMPLE_CLUSTERS=0 keeps one block per row")
    from torch.profiler import ProfilerActivity, profile

    logits = torch.randn(8, vocab, device="cuda") * 4
    logits[:, 100:110] = logits[:, 100:101]  # ties
    logits[1, vocab - 3] = float("nan")  # in the last block's slice
    logits[2] = float("-inf")
    uniform = torch.rand(4, device="cuda")
    configs = [(0.9, 4096, 0.96, 4.0), (1.0, 0, 0.8, None), (0.7, 50, 1.0, 3.0), (0.0, 0, 1.0, 2.0)]
    torch.save([logits.cpu(), uniform.cpu()], tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import torch, mmfast
        logits, uniform = [t.cuda() for t in torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)]
        out = [mmfast.ops.sample(logits if cfg else logits[:4], uniform=uniform, temperature=t, top_k=k, top_p=p,
                                 cfg_scale=cfg, backend="native").cpu() for t, k, p, cfg in {configs!r}]
        torch.save(out, {str(tmp_path / "one_block.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], env={**os.environ, "MMFAST_CUDA_SAMPLE_CLUSTERS": "0"}, check=True)
    one_block = torch.load(tmp_path / "one_block.pt", weights_only=True)
    for (t, k, p, cfg), expected in zip(configs, one_block):
        rows = logits if cfg else logits[:4]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            tokens, _ = _check_sample(rows, uniform, t, k, p, cfg_scale=cfg)
            torch.cuda.synchronize()
        kernels = {event.key for event in prof.key_averages()}
        assert any("sample_cluster_kernel" in name for name in kernels), kernels
        assert torch.equal(tokens.cpu(), expected), (t, k, p, cfg)


@pytest.mark.cuda
def test_cuda_sample_distribution_matches_the_reference():
    """Many draws of one row: the empirical distribution is sample_probs_ref's."""
    logits = torch.randn(1, 50, device="cuda")
    rows = 20000
    tokens = sample(logits.expand(rows, 50), uniform=torch.rand(rows, device="cuda"), temperature=0.8, top_k=20,
                    top_p=0.9, backend="native")
    counts = torch.bincount(tokens.cpu(), minlength=50).double() / rows
    probs = reference.sample_probs_ref(logits.cpu(), 0.8, 20, 0.9)[0]
    assert bool((counts[probs == 0] == 0).all())
    assert (counts - probs).abs().max() < 0.015


@pytest.mark.cuda
def test_cuda_decode_step_on_the_current_stream():
    """append then attend on a side stream: same result as on the default stream."""
    q = torch.randn(2, 1, 8, 64, dtype=torch.float16, device="cuda")
    k_new, v_new = (torch.randn(2, 1, 2, 64, dtype=torch.float16, device="cuda") for _ in range(2))
    k_cache, v_cache = (torch.randn(2, 4096, 2, 64, dtype=torch.float16, device="cuda") for _ in range(2))
    seqlens = torch.tensor([4000, 17], dtype=torch.int32, device="cuda")
    kc, vc = k_cache.clone(), v_cache.clone()
    kv_cache_append(kc, vc, k_new, v_new, seqlens, backend="native")
    expected = decode_attention(q, kc, vc, seqlens + 1, backend="native")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kv_cache_append(k_cache, v_cache, k_new, v_new, seqlens, backend="native")
        out = decode_attention(q, k_cache, v_cache, seqlens + 1, backend="native")
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.cuda
def test_cuda_graph_replays_a_decode_step():
    """append + attend + sample captured once in a CUDA graph and replayed: each replay equals the
    eager step on the same state, and the default generator draws new numbers on every replay."""
    b, t_max, h, h_kv, d = 4, 256, 8, 2, 64
    q = torch.randn(b, 1, h, d, device="cuda")
    k_new, v_new = torch.randn(b, 1, h_kv, d, device="cuda"), torch.randn(b, 1, h_kv, d, device="cuda")
    k_cache, v_cache = torch.randn(b, t_max, h_kv, d, device="cuda"), torch.randn(b, t_max, h_kv, d, device="cuda")
    seqlens = torch.tensor([10, 200, 1, 77], dtype=torch.int32, device="cuda")

    def step():
        kv_cache_append(k_cache, v_cache, k_new, v_new, seqlens, backend="native")
        seqlens.add_(1)
        out = decode_attention(q, k_cache, v_cache, seqlens, backend="native")
        return out, sample(out.flatten(1).float(), top_k=20, top_p=0.9, backend="native")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_tokens = step()
    drawn = []
    for _ in range(3):
        before = (k_cache.clone(), v_cache.clone(), seqlens.clone())
        graph.replay()
        torch.cuda.synchronize()
        k_cache_e, v_cache_e, seqlens_e = before
        kv_cache_append(k_cache_e, v_cache_e, k_new, v_new, seqlens_e, backend="native")
        expected = decode_attention(q, k_cache_e, v_cache_e, seqlens_e + 1, backend="native")
        torch.testing.assert_close(static_out, expected, atol=0, rtol=0)
        assert torch.equal(seqlens, seqlens_e + 1)
        drawn.append(static_tokens.clone())
    assert not all(torch.equal(drawn[0], t) for t in drawn[1:]), "the replays drew the same numbers"


@pytest.mark.cuda
def test_cuda_decode_step_replays_equal_eager_steps_and_recapture_for_new_caches():
    """DecodeStep's own graph (not a silent eager fallback: its warnings are errors here): each
    replay gives the eager step's logits on a twin model; new caches (setup_caches) capture again;
    a replay past the caches' size raises on the host; close() frees the graph."""
    import copy
    import warnings

    from mmfast.models.liquid import DecodeStep
    from mmfast.testing.tiny_liquid import tiny_liquid_lm

    model = tiny_liquid_lm("llama", vocab_size=320, seed=1).to("cuda")
    twin = copy.deepcopy(model)
    prompts = torch.randint(3, 320, (2, 5), generator=torch.Generator().manual_seed(0)).cuda()
    graphed, eager = DecodeStep(model), DecodeStep(twin, cuda_graph=False)
    for max_tokens in (12, 16):  # the second round's caches are new tensors: the same step warms up again
        for lm in (model, twin):
            lm.setup_caches(2, max_tokens)
        with torch.inference_mode():
            token = model.prefill(prompts).argmax(-1, keepdim=True)
            twin.prefill(prompts)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for step in range(max_tokens - 5):
                logits = graphed(token)
                torch.testing.assert_close(logits, eager(token), atol=0, rtol=0)
                assert (graphed.graph is not None) == (step >= 1)  # new caches: a warm-up, then a capture
                token = logits.argmax(-1, keepdim=True)
        with pytest.raises(ValueError, match="do not fit"):
            graphed(token)
    graphed.close()
    assert graphed.graph is None


@pytest.mark.cuda
def test_cuda_liquid_generation_matches_the_cpu():
    """generate_text on CUDA (CUDA-graph decode step) gives the CPU's greedy tokens (fp32)."""
    from mmfast.models.liquid import generate_text
    from mmfast.testing.tiny_liquid import tiny_liquid_lm

    model = tiny_liquid_lm("gemma2", vocab_size=320, seed=4)
    prompts = torch.randint(3, 320, (3, 6), generator=torch.Generator().manual_seed(0))
    expected = generate_text(model, prompts, max_new_tokens=12)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        tokens = generate_text(model.to("cuda"), prompts.cuda(), max_new_tokens=12)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert torch.equal(tokens.cpu(), expected)
