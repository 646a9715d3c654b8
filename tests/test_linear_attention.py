"""mmfast.ops.linear_attention on every backend against the fp32 reference."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import mmfast
from mmfast import reference
from mmfast.ops import linear_attention, linear_attention_apply, linear_attention_state

from _utils import (HAS_CUDA, HAS_TRITON, TRITON_DEVICE, assert_close, assert_grads_close, backend_params, make_qkv,
                    reference_grads)

BACKENDS = backend_params()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, N, H, Dk, Dv): odd sequence lengths, SD-1.5 head dims 40/80/160, Dk != Dv.
SHAPES = [
    (1, 1, 1, 16, 16),
    (2, 7, 5, 40, 40),
    (1, 1025, 5, 64, 64),
    (2, 33, 20, 80, 80),
    (1, 65, 1, 160, 160),
    (2, 19, 3, 40, 80),
    (1, 40, 2, 7, 256),
    (1, 9, 2, 256, 3),
]


# ---- forward ------------------------------------------------------------------------


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(backend_device, dtype, shape):
    backend, device = backend_device
    q, k, v = make_qkv(shape, dtype, device)
    out = linear_attention(q, k, v, backend=backend)
    assert out.shape == (*shape[:3], shape[4]) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, reference.linear_attention_ref(q, k, v), dtype)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("feature_map", ["elu1", "relu", "none"])
def test_feature_maps_and_eps(backend_device, feature_map):
    backend, device = backend_device
    q, k, v = make_qkv((2, 50, 3, 40, 24), torch.float32, device)
    if feature_map == "none":  # keep the denominator away from zero
        q, k = q.abs() + 0.1, k.abs() + 0.1
    for eps in (1e-4, 0.5):
        out = linear_attention(q, k, v, eps=eps, feature_map=feature_map, backend=backend)
        assert_close(out, reference.linear_attention_ref(q, k, v, eps, feature_map), torch.float32)


def _strided_views(shape, dtype, device):
    """Inputs with the strides users produce: (B, H, N, D) transposed, a slice of a wider
    projection, and a last-dim-strided view (the one case that needs a copy)."""
    b, n, h, dk, dv = shape
    bhnd = [torch.randn(b, h, n, d, dtype=dtype, device=device).transpose(1, 2) for d in (dk, dk, dv)]
    fused = torch.randn(b, n, h, 2 * dk + dv + 3, dtype=dtype, device=device)
    sliced = [fused[..., :dk], fused[..., dk : 2 * dk], fused[..., 2 * dk : 2 * dk + dv]]
    wide = [torch.randn(b, n, h, 2 * d, dtype=dtype, device=device)[..., ::2] for d in (dk, dk, dv)]
    return {"bhnd-transposed": bhnd, "projection-slices": sliced, "last-dim-strided": wide}


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("layout", ["bhnd-transposed", "projection-slices", "last-dim-strided"])
def test_non_contiguous_inputs(backend_device, layout):
    backend, device = backend_device
    q, k, v = _strided_views((2, 37, 3, 40, 24), torch.float32, device)[layout]
    assert not q.is_contiguous()
    out = linear_attention(q, k, v, backend=backend)
    assert_close(out, reference.linear_attention_ref(q, k, v), torch.float32)


def test_fp64_on_cpu_is_exact_to_double_precision():
    q, k, v = make_qkv((2, 131, 3, 40, 80), torch.float64, "cpu")
    out = linear_attention(q, k, v, backend="native")
    assert out.dtype == torch.float64
    assert_close(out, reference.linear_attention_ref(q, k, v), torch.float64)


def test_empty_batch_and_heads_give_empty_outputs():
    for shape in [(0, 5, 2, 8, 8), (2, 5, 0, 8, 8)]:
        q, k, v = make_qkv(shape, torch.float32, "cpu")
        out = linear_attention(q, k, v, backend="native")
        assert out.shape == (*shape[:3], shape[4])


# ---- split API -------------------------------------------------------------------------


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_state_and_apply_compose_to_the_fused_op(backend_device):
    backend, device = backend_device
    q, k, v = make_qkv((2, 70, 3, 40, 80), torch.float32, device)
    state, mean = linear_attention_state(k, v, backend=backend)
    ref_state, ref_mean = reference.linear_attention_state_ref(k, v)
    assert state.dtype == mean.dtype == torch.float32
    assert_close(state, ref_state, torch.float32)
    assert_close(mean, ref_mean, torch.float32)
    composed = linear_attention_apply(q, state, mean, backend=backend)
    torch.testing.assert_close(composed, linear_attention(q, k, v, backend=backend), atol=1e-6, rtol=1e-6)


def test_token_shards_combine_exactly():
    """The patch-parallel recipe: states of token shards, weighted by shard length, sum
    to the state of the whole sequence."""
    q, k, v = make_qkv((1, 100, 2, 40, 40), torch.float64, "cpu")
    shards = [(0, 13), (13, 60), (60, 100)]
    state = sum((e - s) * linear_attention_state(k[:, s:e], v[:, s:e])[0] for s, e in shards) / 100
    mean = sum((e - s) * linear_attention_state(k[:, s:e], v[:, s:e])[1] for s, e in shards) / 100
    out = linear_attention_apply(q, state, mean)
    assert_close(out, linear_attention(q, k, v), torch.float64)


# ---- backward ----------------------------------------------------------------------------


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "none"])
@pytest.mark.parametrize("shape, fast_mode", [((2, 37, 3, 5, 7), False), ((1, 70, 2, 40, 16), True)],
                         ids=["(2, 37, 3, 5, 7)", "(1, 70, 2, 40, 16)-fast"])
def test_gradcheck_fp64_cpu(feature_map, shape, fast_mode):
    """The whole Jacobian at the small shape. At D = 40 (the SIMD-blocked paths; 28,000 inputs,
    about 20 s per feature map in full) gradcheck's fast mode, which compares the analytical and
    numerical Jacobians projected on random vectors, u^T J v, and so cannot see an error confined
    to a few entries: there every entry of the fused op's gradients (whose backward runs the state
    and apply passes' kernels) is also compared with the fp64 reference's."""
    q, k, v = make_qkv(shape, torch.float64, "cpu", requires_grad=True)
    if feature_map == "none":
        q, k = [(t.detach().abs() + 0.5).requires_grad_() for t in (q, k)]
    fused = lambda a, b, c: linear_attention(a, b, c, feature_map=feature_map)  # noqa: E731
    assert torch.autograd.gradcheck(fused, (q, k, v), fast_mode=fast_mode)
    if fast_mode:
        grad_out = torch.randn(*shape[:3], shape[4], dtype=torch.float64)
        grads = torch.autograd.grad(fused(q, k, v), (q, k, v), grad_out)
        for got, expected in zip(grads, reference_grads(q, k, v, grad_out, feature_map=feature_map)):
            assert_close(got, expected, torch.float64, scale=max(1.0, expected.abs().max().item()))
    state = lambda b, c: linear_attention_state(b, c, feature_map=feature_map)  # noqa: E731
    assert torch.autograd.gradcheck(state, (k, v), fast_mode=fast_mode)
    s, m = [t.detach().requires_grad_() for t in linear_attention_state(k, v, feature_map=feature_map)]
    apply = lambda a, b, c: linear_attention_apply(a, b, c, feature_map=feature_map)  # noqa: E731
    assert torch.autograd.gradcheck(apply, (q, s, m), fast_mode=fast_mode)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 5, 40, 40), (1, 1025, 2, 64, 64), (1, 33, 2, 160, 80), (2, 1, 1, 16, 24)],
                         ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_reference(backend_device, dtype, shape):
    backend, device = backend_device
    q, k, v = make_qkv(shape, dtype, device, requires_grad=True)
    grad_out = torch.randn(*shape[:3], shape[4], dtype=dtype, device=device)
    grads = torch.autograd.grad(linear_attention(q, k, v, backend=backend), (q, k, v), grad_out)
    assert all(got.dtype == dtype for got in grads)
    # Gradients sum over the sequence: allow for the accumulation order, relative to the largest entry.
    assert_grads_close(grads, reference_grads(q, k, v, grad_out), dtype, 4)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_backward_through_non_contiguous_inputs(backend_device):
    backend, device = backend_device
    q, k, v = [t.detach().requires_grad_() for t in _strided_views((2, 37, 3, 40, 24), torch.float32, device)["bhnd-transposed"]]
    grad_out = torch.randn(2, 37, 3, 24, device=device)
    grads = torch.autograd.grad(linear_attention(q, k, v, backend=backend), (q, k, v), grad_out)
    assert_grads_close(grads, reference_grads(q, k, v, grad_out), torch.float32, 4)


# ---- torch.library integration -----------------------------------------------------------


def _op_samples(device, dtype=torch.float32):
    q, k, v = make_qkv((2, 19, 3, 40, 24), dtype, device)
    state, mean = reference.linear_attention_state_ref(k, v)
    grad_out = torch.randn(2, 19, 3, 24, dtype=dtype, device=device)
    return {
        "linear_attention": (q, k, v, 1e-4, "elu1"),
        "linear_attention_state": (k, v, "elu1"),
        "linear_attention_apply": (q, state, mean, 1e-4, "elu1"),
        "linear_attention_apply_backward": (grad_out, q, state, mean, 1e-4, "elu1"),
        "linear_attention_state_backward": (state, mean, k, v, "relu"),
    }


def _namespace(backend):
    if backend == "native":
        return torch.ops.mmfast
    import mmfast.triton.linear_attention  # noqa: F401  (registers torch.ops.mmfast_triton)

    return torch.ops.mmfast_triton


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("op_name", list(_op_samples("cpu")))
def test_opcheck(backend_device, op_name):
    backend, device = backend_device
    args = _op_samples(device)[op_name]
    grad_args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    op = getattr(_namespace(backend), op_name).default
    torch.library.opcheck(op, args)
    if op_name in ("linear_attention", "linear_attention_state", "linear_attention_apply"):
        torch.library.opcheck(op, grad_args)


@pytest.mark.parametrize("op_name, position, bad", [
    ("linear_attention_apply_backward", 0, lambda t: t.double()),
    ("linear_attention_apply_backward", 0, lambda t: t.to("meta")),
    ("linear_attention_state_backward", 0, lambda t: t.double()),
    ("linear_attention_state_backward", 1, lambda t: t.to("meta")),
], ids=["grad_out fp64", "grad_out on meta", "grad_state fp64", "grad_mean on meta"])
def test_backward_ops_check_gradients_dtype_and_device_as_their_fakes_do(op_name, position, bad):
    """The native ops refused a gradient of another dtype or device; their fakes did not, so
    FakeTensorMode accepted what the op refuses, and a meta gradient beside CPU inputs was routed
    to the fake, which returned uninitialised CPU memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = list(_op_samples("cpu")[op_name])
    args[position] = bad(args[position])
    op = getattr(torch.ops.mmfast, op_name).default
    with pytest.raises(TypeError, match="same device|same dtype|must be torch.float32"):
        op(*args)
    if args[position].device.type != "meta":
        mode = FakeTensorMode()
        with mode, pytest.raises(TypeError, match="same dtype|must be torch.float32"):
            op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])


def test_state_backward_shape_error_names_the_expected_shapes():
    """The native op said only '(B, H, Dk, Dv)'; now it gives the numbers as the Python check
    (Triton, fakes) does, in the same words."""
    k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 7)
    shapes = r"grad_state must be \(B, H, Dk, Dv\) = \[1, 2, 8, 7\] and grad_mean \(B, H, Dk\) = \[1, 2, 8\], got"
    with pytest.raises(ValueError, match=shapes):
        torch.ops.mmfast.linear_attention_state_backward(torch.zeros(1, 2, 8, 6), torch.zeros(1, 2, 8), k, v, "elu1")
    from mmfast.ops.linear_attention import check_state_backward

    with pytest.raises(ValueError, match=shapes):
        check_state_backward(torch.zeros(1, 2, 8, 6), torch.zeros(1, 2, 8), k, v, "elu1")


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_torch_compile_fullgraph(backend_device):
    backend, device = backend_device
    torch._dynamo.reset()

    def attention_block(q, k, v):
        out = linear_attention(torch.nn.functional.silu(q), k, v * 2, backend=backend)
        return out.sum(dim=2)

    compiled = torch.compile(attention_block, fullgraph=True, backend="aot_eager")
    q, k, v = make_qkv((2, 33, 3, 40, 24), torch.float32, device, requires_grad=True)
    out = compiled(q, k, v)
    expected = attention_block(q, k, v)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_torch_compile_fullgraph_of_state_and_apply(backend_device):
    """The two-pass API (state once, apply to other queries: patch parallelism, LinFusion's
    cross-context layers) under fullgraph compile, gradients included."""
    backend, device = backend_device
    torch._dynamo.reset()

    def two_pass(q, k, v):
        state, mean = linear_attention_state(k, v, feature_map="relu", backend=backend)
        return linear_attention_apply(q, state * 0.5, mean, eps=1e-3, feature_map="relu", backend=backend)

    compiled = torch.compile(two_pass, fullgraph=True, backend="aot_eager")
    q, k, v = make_qkv((2, 21, 3, 24, 16), torch.float32, device, requires_grad=True)
    out, expected = compiled(q, k, v), two_pass(q, k, v)
    torch.testing.assert_close(out, expected)
    for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))):
        torch.testing.assert_close(got, want)


def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    q, k, v = make_qkv((1, 40, 2, 16, 16), torch.float32, "cpu")
    compiled = torch.compile(lambda a, b, c: linear_attention(a, b, c) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), linear_attention(q, k, v) * 2)


# ---- errors ------------------------------------------------------------------------------

_QK_SHAPES = r"q and k must have the same \(B, N, H, Dk\) shape, got q \[1, 5, 2, 8\] and k "
BAD_INPUTS = {
    "rank": (lambda: (torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16)), ValueError, "4-D"),
    "batch mismatch": (lambda: make_qkv((2, 5, 2, 8, 8), torch.float32, "cpu")[:2] + [torch.randn(3, 5, 2, 8)],
                       ValueError, "agree in"),
    "seq mismatch": (lambda: [torch.randn(1, 5, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)],
                     ValueError, _QK_SHAPES + r"\[1, 6, 2, 8\]"),
    "head mismatch": (lambda: [torch.randn(1, 5, 2, 8), torch.randn(1, 5, 3, 8), torch.randn(1, 5, 3, 8)],
                      ValueError, _QK_SHAPES + r"\[1, 5, 3, 8\]"),
    "Dk too large": (lambda: make_qkv((1, 5, 1, 257, 8), torch.float32, "cpu"), ValueError, r"\[1, 256\]"),
    "Dv too large": (lambda: make_qkv((1, 5, 1, 8, 300), torch.float32, "cpu"), ValueError, r"\[1, 256\]"),
    "Dk zero": (lambda: make_qkv((1, 5, 1, 0, 8), torch.float32, "cpu"), ValueError, r"\[1, 256\]"),
    "mixed dtypes": (lambda: [torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8).half(), torch.randn(1, 5, 2, 8)],
                     TypeError, "same dtype"),
    "integer dtype": (lambda: [torch.ones(1, 5, 2, 8, dtype=torch.int32)] * 3, TypeError, "float32, float16"),
    "empty sequence": (lambda: make_qkv((1, 0, 2, 8, 8), torch.float32, "cpu"), ValueError, "at least 1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("entry", ["public", "torch.ops"])
def test_bad_inputs_raise_clear_errors(case, entry):
    make, error, message = BAD_INPUTS[case]
    q, k, v = make()
    with pytest.raises(error, match=message):
        if entry == "public":
            linear_attention(q, k, v)
        else:
            torch.ops.mmfast.linear_attention(q, k, v, 1e-4, "elu1")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("case", ["rank", "batch mismatch", "Dk too large", "mixed dtypes", "empty sequence"])
def test_bad_inputs_raise_on_triton(case):
    make, error, message = BAD_INPUTS[case]
    q, k, v = [t.to(TRITON_DEVICE) for t in make()]
    with pytest.raises(error, match=message):
        linear_attention(q, k, v, backend="triton")


def test_mixed_devices_raise():
    q, k, v = make_qkv((1, 5, 2, 8, 8), torch.float32, "cpu")
    other = "cuda" if HAS_CUDA else "meta"
    with pytest.raises(TypeError, match="same device"):
        linear_attention(q, k.to(other), v)


def test_bad_feature_map_and_backend():
    q, k, v = make_qkv((1, 5, 2, 8, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="feature_map"):
        torch.ops.mmfast.linear_attention(q, k, v, 1e-4, "softmax")
    for call in (lambda: linear_attention(q, k, v, feature_map=None),
                 lambda: linear_attention_state(k, v, feature_map=None)):
        with pytest.raises(ValueError, match="feature_map must be one of"):  # not the schema's "expected str"
            call()
    for eps in (True, torch.tensor(1e-4)):  # not "must be a finite number >= 0, got tensor(1.0000e-04)"
        with pytest.raises(TypeError, match="eps must be a Python float"):
            linear_attention(q, k, v, eps=eps)
    for call in (lambda: linear_attention(q.tolist(), k, v), lambda: linear_attention_state(k, None),
                 lambda: linear_attention_apply(q, 1.0, k)):  # not an AttributeError from deep inside
        with pytest.raises(TypeError, match="must be a torch.Tensor, got"):
            call()
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_attention(q, k, v, backend="cudnn")
    with pytest.raises(ValueError, match="not a device: the device is the tensors' own"):  # a common mistake
        mmfast.set_backend("cuda")


def test_apply_rejects_mismatched_state():
    q, k, v = make_qkv((1, 5, 2, 8, 8), torch.float32, "cpu")
    state, mean = linear_attention_state(k, v)
    with pytest.raises(ValueError, match="state must be"):
        linear_attention_apply(q, state[:, :1], mean)
    with pytest.raises(TypeError, match="must be torch.float32 for torch.float32 inputs"):
        linear_attention_apply(q, state.double(), mean)
    with pytest.raises(TypeError, match="must be torch.float32 for torch.float32 inputs"):
        linear_attention_apply(q, state.double(), mean, backend="reference")


def test_apply_to_no_queries_gives_an_empty_result():
    """An op-level trial: q with 0 tokens was refused ("N must be at least 1"), though a given
    state needs no tokens of q (a split's empty last chunk)."""
    q, k, v = make_qkv((1, 5, 2, 8, 6), torch.float64, "cpu")
    state, mean = linear_attention_state(k, v)
    empty = q[:, :0].clone().requires_grad_()
    state = state.clone().requires_grad_()
    out = linear_attention_apply(empty, state, mean)
    assert out.shape == (1, 0, 2, 6) and out.dtype == torch.float64
    out.sum().backward()
    assert empty.grad.shape == empty.shape and state.grad.eq(0).all()
    with pytest.raises(ValueError, match="state must be"):  # still checked
        linear_attention_apply(q[:, :0], state[:, :1], mean)
    with pytest.raises(ValueError, match="backend must be one of"):  # so is the backend's name
        linear_attention_apply(q[:, :0], state, mean, backend="natve")


@pytest.mark.parametrize("backend", ["native", "reference"] + (["triton"] if HAS_TRITON else []))
def test_state_and_apply_errors_name_their_own_op(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    q, k, v = make_qkv((1, 5, 2, 8, 8), torch.float32, device)
    state, mean = linear_attention_state(k, v, backend=backend)
    with pytest.raises(ValueError, match="^linear_attention_state: k and v must agree"):
        linear_attention_state(k, v[:, :4], backend=backend)
    with pytest.raises(ValueError, match="^linear_attention_state: feature_map"):
        linear_attention_state(k, v, feature_map="softmax", backend=backend)
    with pytest.raises(ValueError, match="^linear_attention_apply: mean must be"):
        linear_attention_apply(q, state, mean[..., :7], backend=backend)
    with pytest.raises(ValueError, match="^linear_attention_apply: eps"):
        linear_attention_apply(q, state, mean, eps=-1.0, backend=backend)


# ---- backend selection -------------------------------------------------------------------


def test_backend_selection_global_and_scoped():
    q, k, v = make_qkv((1, 9, 2, 8, 8), torch.float32, "cpu")
    expected = reference.linear_attention_ref(q, k, v)
    assert mmfast.get_backend() == "auto"
    with mmfast.use_backend("reference"):
        assert mmfast.get_backend() == "reference"
        assert_close(linear_attention(q, k, v), expected, torch.float32)
    mmfast.set_backend("native")
    try:
        assert mmfast.get_backend() == "native"
        assert_close(linear_attention(q, k, v), expected, torch.float32)
    finally:
        mmfast.set_backend("auto")


def test_scoped_backend_stays_with_its_thread_and_asyncio_task():
    """A systems trial: use_backend was thread-local, so two asyncio tasks on one thread ran with
    each other's backends and the loop's thread was left on one for good."""
    import asyncio
    import threading

    async def task(backend, delay):
        with mmfast.use_backend(backend):
            await asyncio.sleep(delay)
            return backend, mmfast.get_backend()

    async def both():
        return await asyncio.gather(task("reference", 0.02), task("native", 0.04))

    assert asyncio.run(both()) == [("reference", "reference"), ("native", "native")]
    assert mmfast.get_backend() == "auto"
    seen = []
    with mmfast.use_backend("reference"):
        thread = threading.Thread(target=lambda: seen.append(mmfast.get_backend()))
        thread.start()
        thread.join()
    assert seen == ["auto"]  # a new thread starts from the process default


def test_native_backend_without_a_kernel_says_so():
    # Meta tensors run (the fake kernels, test_linear_attention_numerics.py); XPU has no kernels.
    with pytest.raises(RuntimeError, match="no kernel for xpu tensors"):
        mmfast._backend.resolve("linear_attention", torch.device("xpu"), "native")
    with pytest.raises(RuntimeError, match="no compiled kernel for xpu tensors.*backend='triton' or backend='reference'"):
        mmfast._backend.resolve("linear_attention", torch.device("xpu"), "auto")


# ---- CPU kernel variants -------------------------------------------------------------------

ISA_SCRIPT = textwrap.dedent(
    """
    import torch, mmfast
    from mmfast import reference
    torch.manual_seed(0)
    assert torch.ops.mmfast.cpu_isa() == "{isa}", torch.ops.mmfast.cpu_isa()
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)):
        for b, n, h, dk, dv in ((2, 67, 3, 40, 80), (1, 5, 2, 7, 3), (1, 300, 1, 160, 64)):
            q, k = torch.randn(2, b, n, h, dk, dtype=dtype)
            v = torch.randn(b, n, h, dv, dtype=dtype)
            ref = reference.linear_attention_ref(q, k, v).double()
            torch.testing.assert_close(mmfast.linear_attention(q, k, v).double(), ref, atol=tol, rtol=tol)
    q, k, v = (torch.randn(1, 40, 2, 24, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(mmfast.linear_attention, (q, k, v))
    print("ok")
    """
)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_cpu_kernel_variant(isa):
    supported = subprocess.run(
        [sys.executable, "-c", "import torch, mmfast; print(torch.ops.mmfast.cpu_isa())"],
        env={**os.environ, "MMFAST_CPU_ISA": isa}, capture_output=True, text=True,
    )
    if supported.returncode != 0 and "does not support it" in supported.stderr:
        pytest.skip(f"this CPU has no {isa}")
    result = subprocess.run(
        [sys.executable, "-c", ISA_SCRIPT.format(isa=isa)],
        env={**os.environ, "MMFAST_CPU_ISA": isa}, capture_output=True, text=True,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_bad_cpu_isa_name_is_an_error():
    result = subprocess.run(
        [sys.executable, "-c", "import torch, mmfast; torch.ops.mmfast.cpu_isa()"],
        env={**os.environ, "MMFAST_CPU_ISA": "sse9"}, capture_output=True, text=True,
    )
    assert result.returncode != 0 and "MMFAST_CPU_ISA must be generic, avx2 or avx512" in result.stderr
    report = subprocess.run([sys.executable, "-m", "mmfast"], env={**os.environ, "MMFAST_CPU_ISA": "sse9"},
                            capture_output=True, text=True)  # the report still prints, naming the error
    assert report.returncode == 0 and "CPU ISA: ERROR: MMFAST_CPU_ISA must be generic" in report.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_without_the_split_over_n_is_the_same_op():
    """The benchmarks' stand-in for fla-org's design (one program streams all of N)."""
    from mmfast.triton import linear_attention as triton_la

    q, k, v = make_qkv((1, 700, 2, 40, 24), torch.float32, TRITON_DEVICE, requires_grad=True)
    triton_la.SPLIT_SEQUENCE = False
    try:
        out = linear_attention(q, k, v, backend="triton")
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    finally:
        triton_la.SPLIT_SEQUENCE = True
    assert_close(out, reference.linear_attention_ref(q, k, v), torch.float32)
    assert_grads_close(grads, reference_grads(q, k, v, torch.ones_like(out)), torch.float32, 4)


def test_python_m_mmfast_help_and_json():
    """`python -m mmfast --help` explains itself instead of ignoring the flag; --json is machine-readable."""
    helped = subprocess.run([sys.executable, "-m", "mmfast", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "usage: python -m mmfast" in helped.stdout and "--json" in helped.stdout
    report = subprocess.run([sys.executable, "-m", "mmfast", "--json"], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-2000:]
    facts = json.loads(report.stdout)
    assert facts["torch"] == torch.__version__ and "linear_attention" in facts["CPU kernels"]
    assert facts["Python"] == platform.python_version() and facts["CPU"] and facts["default backend"] == "auto"
    assert facts["CPU threads (torch)"] >= 1 and isinstance(facts["MMFAST_* settings"], dict)
    commit = facts["built from commit"]  # setup.py's `git rev-parse`; None outside a checkout
    assert commit is None or re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", commit), commit
    assert facts["OS"] == platform.platform() and facts["packages"]["numpy"] == np.__version__
    assert facts["build vs sources"].startswith(("current", "STALE", "unknown")), facts["build vs sources"]
    wrong = subprocess.run([sys.executable, "-m", "mmfast", "--frobnicate"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unrecognized arguments: --frobnicate" in wrong.stderr
    # bad settings the ops read lazily are flagged here (a systems trial saw only the raw value)
    bad = subprocess.run([sys.executable, "-m", "mmfast", "--json"], capture_output=True, text=True,
                         env={**os.environ, "MMFAST_CPU_OUTPUT_POOL_MB": "abc", "MMFAST_CPU_HUGE_PAGES": "yes",
                              "MMFAST_PRUNED_WEIGHT_CACHE_MB": "64"})
    settings = json.loads(bad.stdout)["MMFAST_* settings"]
    assert "ERROR: must be a whole number" in settings["MMFAST_CPU_OUTPUT_POOL_MB"]
    assert "ERROR: must be 0 or 1" in settings["MMFAST_CPU_HUGE_PAGES"]
    assert settings["MMFAST_PRUNED_WEIGHT_CACHE_MB"] == "64"
    assert facts["GPUs"] is None if not torch.cuda.is_available() else len(facts["GPUs"]) == torch.cuda.device_count()
    assert "NVIDIA driver" in facts


@pytest.mark.parametrize("archs, capability, expected", [
    ("8.0+PTX;9.0a", (9, 0), "binary for 9.0a"),          # the CI build on an H100/H200
    ("8.0+PTX;9.0a", (8, 6), "binary for 8.0"),           # same major, later minor
    ("8.0+PTX;9.0a", (12, 0), "PTX of 8.0"),              # JIT by the driver
    ("9.0a+PTX;10.0a", (12, 0), "NONE for sm_120"),       # arch-specific PTX runs nowhere else
    ("9.0a", (9, 0), "binary for 9.0a"),
    ("9.0a", (10, 0), "NONE for sm_100"),                 # "a" SASS is not forward-compatible
    ("9.0;9.0a", (9, 0), "binary for 9.0, 9.0a"),         # both: the driver may pick either
    (None, (9, 0), "none (a CPU-only build)"),
    ("Hopper", (9, 0), "unknown"),
    ("10.0f", (10, 3), "binary for 10.0f"),               # family code: later minors of its major
    ("10.0f", (12, 0), "NONE for sm_120"),
    ("10.0f+PTX", (12, 0), "NONE for sm_120"),            # family PTX stays in its major
    ("10.3a;10.0f", (10, 3), "binary for 10.3a, 10.0f"),
    ("10.3a", (10, 0), "NONE for sm_100"),                # a later minor's "a" code: no
])
def test_python_m_mmfast_says_whether_the_gpu_has_kernels(archs, capability, expected):
    """`python -m mmfast` says which compiled code each GPU runs, and the rebuild when none
    (a "no kernel image" error at the first op otherwise)."""
    from mmfast._info import arch_coverage

    assert arch_coverage(archs, capability).startswith(expected)
    if expected.startswith("NONE"):
        assert "TORCH_CUDA_ARCH_LIST=" in arch_coverage(archs, capability)


def test_import_mmfast_does_not_import_dynamo():
    """`import mmfast` stays off torch._dynamo (~1 s): the Triton backend's import hook carries
    assume_constant_result's flag directly, which must stay what that decorator sets."""
    code = "import sys, mmfast; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.stdout.strip() == "False", result.stdout + result.stderr

    def probe():
        return True

    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe and probe.__dict__ == {"_dynamo_marked_constant": True}
    assert mmfast._backend._import_kernel_module._dynamo_marked_constant is True
