"""CUDA-only tests of the linear-attention kernels: run on a machine with an NVIDIA GPU
(`make gpu-check`); skipped elsewhere (the host emulator covers the kernels in CI)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmfast import reference
from mmfast.ops import linear_attention

from _utils import assert_close, assert_grads_close, make_qkv, reference_grads

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.cuda
def test_cuda_large_sequence_split_reduction():
    """Many N-chunks per (b, h): the split state and its reduction on the GPU."""
    q, k, v = make_qkv((1, 70000, 2, 64, 64), torch.bfloat16, "cuda")
    out = linear_attention(q, k, v, backend="native")
    assert_close(out, reference.linear_attention_ref(q, k, v), torch.bfloat16)


@pytest.mark.cuda
def test_cuda_fp64_forward_and_backward():
    q, k, v = make_qkv((2, 130, 3, 40, 80), torch.float64, "cuda", requires_grad=True)
    grad_out = torch.randn(2, 130, 3, 80, dtype=torch.float64, device="cuda")
    out = linear_attention(q, k, v, backend="native")
    assert_close(out, reference.linear_attention_ref(q, k, v), torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for got, expected in zip(grads, reference_grads(q, k, v, grad_out)):
        assert_close(got, expected, torch.float64, scale=10)


@pytest.mark.cuda
def test_cuda_more_heads_than_a_grid_dimension_holds():
    """B*H above 65535: the launch must not put B*H in a capped grid dimension."""
    q, k, v = make_qkv((2, 5, 35000, 16, 16), torch.float32, "cuda")
    out = linear_attention(q, k, v, backend="native")
    assert_close(out, reference.linear_attention_ref(q, k, v), torch.float32)


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream():
    q, k, v = make_qkv((2, 4096, 4, 64, 64), torch.bfloat16, "cuda")
    expected = linear_attention(q, k, v, backend="native")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = linear_attention(q, k, v, backend="native")
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.cuda
def test_cuda_graphs_through_torch_compile_reduce_overhead():
    torch._dynamo.reset()
    q, k, v = make_qkv((1, 2048, 8, 40, 40), torch.float16, "cuda")
    compiled = torch.compile(lambda a, b, c: linear_attention(a, b, c) * 2, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        out = compiled(q, k, v)
    assert_close(out, reference.linear_attention_ref(q, k, v).double() * 2, torch.float16, scale=2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_agrees_with_the_cpu_kernel(dtype):
    q, k, v = make_qkv((2, 3000, 8, 80, 80), dtype, "cpu", requires_grad=True)
    grad_out = torch.randn(2, 3000, 8, 80, dtype=dtype)
    cpu_out = linear_attention(q, k, v, backend="native")
    cpu_grads = torch.autograd.grad(cpu_out, (q, k, v), grad_out)
    qc, kc, vc = [t.detach().cuda().requires_grad_() for t in (q, k, v)]
    cuda_out = linear_attention(qc, kc, vc, backend="native")
    cuda_grads = torch.autograd.grad(cuda_out, (qc, kc, vc), grad_out.cuda())
    assert_close(cuda_out.cpu(), cpu_out, dtype, scale=2)
    assert_grads_close([g.cpu() for g in cuda_grads], cpu_grads, dtype, 8)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_tensor_core_path_matches_the_exact_path(dtype, tmp_path):
    """fp16/bf16 use TF32 tensor cores; MMFAST_CUDA_TENSOR_CORES=0 selects the SIMT fp32 path."""
    inputs = make_qkv((2, 5000, 4, 80, 64), dtype, "cpu")
    torch.save(inputs, tmp_path / "qkv.pt")
    script = textwrap.dedent(
        f"""
        import torch, mmfast
        q, k, v = (t.cuda() for t in torch.load({str(tmp_path / "qkv.pt")!r}, weights_only=True))
        torch.save(mmfast.linear_attention(q, k, v).cpu(), {str(tmp_path / "exact.pt")!r})
        """
    )
    env = {**os.environ, "MMFAST_CUDA_TENSOR_CORES": "0"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    exact = torch.load(tmp_path / "exact.pt", weights_only=True)
    fast = linear_attention(*(t.cuda() for t in inputs), backend="native").cpu()
    expected = reference.linear_attention_ref(*inputs)
    assert_close(exact, expected, dtype)
    assert_close(fast, expected, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_async_copy_path_matches_the_register_staged_path(dtype, tmp_path):
    """fp16/bf16 rows on 16-byte boundaries stream through the cp.async kernels (state ring,
    persistent apply); MMFAST_CUDA_ASYNC_COPY=0 or an unaligned row selects the register-staged
    kernels. All three agree with the fp64 reference, forward and backward (the backward's
    state pass also runs through the ring). Many items per persistent block: B*H*N/64 >> SMs."""
    shape = (2, 9000, 6, 64, 64)
    inputs = make_qkv(shape, dtype, "cpu")
    grad_out = torch.randn(*shape[:3], shape[4], dtype=dtype)
    torch.save((*inputs, grad_out), tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import torch, mmfast
        q, k, v, g = (t.cuda() for t in torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = mmfast.linear_attention(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), g)
        torch.save([t.cpu() for t in (out, *grads)], {str(tmp_path / "staged.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], env={**os.environ, "MMFAST_CUDA_ASYNC_COPY": "0"}, check=True)
    staged = torch.load(tmp_path / "staged.pt", weights_only=True)

    def run(q, k, v):
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = linear_attention(q, k, v, backend="native")
        return [t.cpu() for t in (out, *torch.autograd.grad(out, (q, k, v), grad_out.cuda()))]

    aligned = run(*(t.cuda() for t in inputs))

    def unaligned(t):  # the same values one element into a padded buffer: not 16-byte aligned
        buffer = torch.empty(*t.shape[:-1], t.shape[-1] + 1, dtype=dtype, device="cuda")
        buffer[..., 1:] = t.cuda()
        return buffer[..., 1:]

    misaligned = run(*(unaligned(t) for t in inputs))
    expected_out = reference.linear_attention_ref(*(t.double() for t in inputs))
    expected = [expected_out, *reference_grads(*inputs, grad_out)]
    for results in (aligned, staged, misaligned):
        assert_close(results[0], expected[0], dtype, scale=2)
        assert_grads_close(results[1:], expected[1:], dtype, 8)  # as the smoke test


@pytest.mark.cuda
@pytest.mark.parametrize("feature_map", ["elu1", "relu", "none"])
def test_cuda_smoke_every_op_dtype_and_odd_shape(feature_map):
    """Small and odd shapes of every op, dtype and feature map, forward and backward: the
    subset `make gpu-check` also runs under compute-sanitizer (memcheck, racecheck). The backward's
    tensor-core kernel takes the 16-bit cases with 16-byte rows up to 160 dims at each of its tile
    widths: 64 (40 x 24), 80 (64 x 80), 160 (160 x 128)."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for shape in [(1, 1, 1, 1, 1), (2, 7, 3, 40, 24), (1, 70, 2, 80, 7), (1, 300, 1, 160, 256), (1, 130, 3, 64, 80),
                      (1, 100, 2, 160, 128)]:
            q, k, v = make_qkv(shape, dtype, "cuda", requires_grad=True)
            if feature_map == "none":  # keep the denominator away from zero
                q, k = [(t.detach().abs() + 0.1).requires_grad_() for t in (q, k)]
            grad_out = torch.randn(*shape[:3], shape[4], dtype=dtype, device="cuda")
            out = linear_attention(q, k, v, feature_map=feature_map, backend="native")
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
            assert_close(out, reference.linear_attention_ref(q, k, v, 1e-4, feature_map), dtype, scale=2)
            expected = reference_grads(q, k, v, grad_out, feature_map=feature_map)
            assert_grads_close(grads, expected, dtype, 8)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_results_are_bitwise_identical_run_to_run(dtype):
    """The split-N partials are reduced in a fixed order: no atomics, no run-to-run drift."""
    q, k, v = make_qkv((2, 70000, 3, 64, 64), dtype, "cuda", requires_grad=True)
    grad_out = torch.randn(2, 70000, 3, 64, dtype=dtype, device="cuda")
    runs = []
    for _ in range(2):
        out = linear_attention(q, k, v, backend="native")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for name, a, b in zip(["out", "dq", "dk", "dv"], *runs):
        assert torch.equal(a, b), name


@pytest.mark.cuda
def test_triton_more_heads_than_a_grid_dimension_holds():
    """B*H above 65535 on the Triton backend: every grid is 1-D, unfolded in the kernels."""
    q, k, v = make_qkv((2, 5, 35000, 16, 16), torch.float32, "cuda", requires_grad=True)
    out = linear_attention(q, k, v, backend="triton")
    assert_close(out, reference.linear_attention_ref(q, k, v), torch.float32)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert_grads_close(grads, reference_grads(q, k, v, torch.ones_like(out)), torch.float32, 4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_state_of_16bit_inputs_keeps_fp32_accuracy(dtype):
    """The cp.async state kernel multiplies phi(k) as a 16-bit hi + lo pair on mma.sync (fp32
    sums flushed into fp64 every 64 tokens): S and m within 1e-4 of the fp64 reference,
    relative to their largest entry (the pair keeps about 2^-16 of each phi(k); one bf16
    rounding keeps 2^-9)."""
    from mmfast.ops import linear_attention_state

    k, v = (torch.randn(2, 20000, 4, 64, dtype=dtype) for _ in range(2))
    k_ref, v_ref = k.clone(), v.clone()
    state, mean = linear_attention_state(k.cuda(), v.cuda(), backend="native")
    expected_state, expected_mean = reference.linear_attention_state_ref(k_ref, v_ref)
    for got, expected in ((state, expected_state), (mean, expected_mean)):
        error = (got.cpu().double() - expected.double()).abs().max() / expected.double().abs().max()
        assert error < 1e-4, error


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [40, 64])
def test_cuda_backward_of_queries_whose_normaliser_is_eps_alone(dtype, dim):
    """relu keys that are 0 in half the dims, and a third of the queries living only there: z =
    eps, phi(q) / z up to 2.4e5, past fp16's 65504 (the cp.async backward's A operand gave every
    grad_v of the head NaN; operand_balance moves half of 1 / z's exponent to B). Each gradient
    within the dtype's tolerance of its largest entry, as the emulator's run_tiny_normaliser
    (measured there at most 4e-4 in fp16)."""
    g = torch.Generator().manual_seed(7)
    shape = (1, 150, 2, dim)
    q, k, v, grad_out = (torch.rand(*shape, generator=g, dtype=torch.float64) * 3 - 1.5 for _ in range(4))
    half = dim // 2
    k[..., :half] = -3 * torch.rand(*shape[:3], half, generator=g, dtype=torch.float64)  # relu(k) = 0 there
    lonely = torch.arange(150) % 3 == 0
    q[:, lonely, :, :half] = 8 + 16 * torch.rand(1, int(lonely.sum()), 2, half, generator=g, dtype=torch.float64)
    q[:, lonely, :, half:] = -3 * torch.rand(1, int(lonely.sum()), 2, dim - half, generator=g, dtype=torch.float64)
    q, k, v, grad_out = (t.to(dtype) for t in (q, k, v, grad_out))
    leaves = [t.cuda().requires_grad_() for t in (q, k, v)]
    out = linear_attention(*leaves, eps=1e-4, feature_map="relu", backend="native")
    grads = torch.autograd.grad(out, leaves, grad_out.cuda())
    expected = reference_grads(q, k, v, grad_out, eps=1e-4, feature_map="relu")
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, got, want in zip("qkv", grads, expected):
        assert torch.isfinite(got).all(), f"grad_{name} is not finite"
        error = (got.cpu().double() - want).abs().max() / want.abs().max()
        assert error <= tol, f"grad_{name}: {error:.3g} of its largest entry"


@pytest.mark.cuda
@pytest.mark.parametrize("scale", [1e-7, 1e6])
def test_cuda_fp16_apply_takes_states_outside_the_fp16_range(scale):
    """The cp.async apply kernel scales the fp32 state columns and m by powers of two before
    splitting them into fp16 hi + lo (fp16: subnormal below 6.1e-5, inf past 65504)."""
    from mmfast.ops import linear_attention_apply

    q, k, v = make_qkv((1, 3000, 2, 64, 64), torch.float16, "cpu")
    state, mean = reference.linear_attention_state_ref(k, v)
    state, mean = state * scale, mean * scale
    out = linear_attention_apply(q.cuda(), state.cuda(), mean.cuda(), backend="native")
    assert_close(out.cpu(), reference.linear_attention_apply_ref(q, state, mean), torch.float16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_backward_takes_state_views_at_any_float_offset(dtype):
    """The backward's tile kernel reads the fp32 state and mean (apply_backward) and grad_state
    and grad_mean (state_backward) from views that start 4 bytes past an 8-byte boundary (a slice
    of a larger buffer: contiguous, so nothing copies it): the gradients equal those of the same
    values at an aligned address, bit for bit."""
    ops = torch.ops.mmfast
    q, k, v = make_qkv((1, 500, 2, 64, 64), dtype, "cuda")
    grad_out = torch.randn(1, 500, 2, 64, dtype=dtype, device="cuda")
    state, mean = ops.linear_attention_state(k, v, "elu1")

    def shifted(t):  # the same values one float into a buffer
        view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 8 == 4
        return view

    aligned = ops.linear_attention_apply_backward(grad_out, q, state, mean, 1e-4, "elu1")
    offset = ops.linear_attention_apply_backward(grad_out, q, shifted(state), shifted(mean), 1e-4, "elu1")
    grad_state, grad_mean = aligned[1], aligned[2]
    aligned += ops.linear_attention_state_backward(grad_state, grad_mean, k, v, "elu1")
    offset += ops.linear_attention_state_backward(shifted(grad_state), shifted(grad_mean), k, v, "elu1")
    for got, want in zip(offset, aligned):
        assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 9000, 6, 64), (1, 70000, 2, 40), (4, 50, 3, 64)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_fused_state_sums_match_the_state_pass(dtype, shape, tmp_path):
    """At head dims up to 64 apply_backward's tile kernel sums grad_state and grad_mean itself
    (units of token tiles, fp32 partials summed in fp64: several units per head, and one, which
    it writes directly): no state pass runs after it. MMFAST_CUDA_LA_BACKWARD_FUSED=0 leaves them
    to the state pass. Both multiply the same operands, so they differ only in summation order:
    within 1e-5 of the largest entry; grad_q is the same code's (within 2 ulps); and both are
    within 2% of the fp64 reference's largest entry (z from the 16-bit rounded phi(q), as the
    kernels compute it: a missing unit would be off by several percent)."""
    switches = (("MMFAST_CUDA_LA_BACKWARD_FUSED", "0"), ("MMFAST_CUDA_LA_BACKWARD_3BLOCKS", "1"),
                ("MMFAST_CUDA_ASYNC_COPY", "0"), ("MMFAST_CUDA_TENSOR_CORES", "0"))
    for switch, off in switches:
        if os.environ.get(switch, "")[:1] == off:
            pytest.skip(f"{switch}={off} selects another backward kernel")
    from torch.profiler import ProfilerActivity, profile

    ops = torch.ops.mmfast
    B, N, H, D = shape
    q, k, v = make_qkv((B, N, H, D, D), dtype, "cuda")
    grad_out = torch.randn(B, N, H, D, dtype=dtype, device="cuda")
    state, mean = ops.linear_attention_state(k, v, "elu1")
    torch.save([t.cpu() for t in (grad_out, q, state, mean)], tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import torch, mmfast
        args = [t.cuda() for t in torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)]
        grads = torch.ops.mmfast.linear_attention_apply_backward(*args, 1e-4, "elu1")
        torch.save([t.cpu() for t in grads], {str(tmp_path / "unfused.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], env={**os.environ, "MMFAST_CUDA_LA_BACKWARD_FUSED": "0"}, check=True)
    unfused = torch.load(tmp_path / "unfused.pt", weights_only=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fused = ops.linear_attention_apply_backward(grad_out, q, state, mean, 1e-4, "elu1")
        torch.cuda.synchronize()
    kernels = {event.key for event in prof.key_averages()}
    assert any("la_backward_async_kernel" in name for name in kernels), kernels
    assert not any("la_state_async_kernel" in name or "la_state_kernel" in name for name in kernels), kernels
    fused = [t.cpu() for t in fused]
    ulps = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(fused[0].double(), unfused[0].double(), rtol=ulps,
                               atol=ulps * unfused[0].double().abs().max().item())
    for got, other in zip(fused[1:], unfused[1:]):
        assert (got.double() - other.double()).abs().max() <= 1e-5 * other.double().abs().max()

    q64, state64, mean64 = (t.detach().cpu().double().requires_grad_() for t in (q, state, mean))
    out = reference.linear_attention_apply_ref(q64, state64, mean64)
    expected = torch.autograd.grad(out, (q64, state64, mean64), grad_out.cpu().double())
    assert_grads_close(fused[:1], expected[:1], dtype, 8)
    for got, want in zip(fused[1:], expected[1:]):
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error < 2e-2, error
