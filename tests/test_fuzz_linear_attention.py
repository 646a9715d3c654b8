"""Property-based tests (hypothesis) of the linear-attention ops on every backend here.

Random shapes (0- and 1-sized, odd dims), strides (transposed, sliced, expanded stride-0,
channels-last-like, last-dim strided), dtypes and values (huge magnitudes, denormals, NaN,
Inf) against the fp64 reference: equal NaN pattern, per-dtype tolerance elsewhere, forward
and backward; random bad inputs must raise ValueError / TypeError with a message. Bounded
for CI: a fixed seed (derandomize) and MMFAST_FUZZ_EXAMPLES examples per property (default
40; raise it for a long local run, MMFAST_FUZZ_RANDOM=1 for new examples). Every failure
found becomes a plain regression test below.
"""
from __future__ import annotations

import re

import pytest
import torch

from mmfast import reference
from mmfast.ops import linear_attention, linear_attention_apply, linear_attention_state

from _utils import HAS_TRITON, TOLERANCES, TRITON_DEVICE, fuzz_settings, gradient_scale, subnormal_step

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = fuzz_settings()

# The kernels only: the reference backend is mmfast.reference, the oracle itself (a third of the
# examples compared it with itself); its own unit tests cover its layouts and dtypes.
BACKENDS = ["native"] + (["triton"] if HAS_TRITON else [])
DEVICES = {"native": "cpu", "reference": "cpu", "triton": TRITON_DEVICE}
LAYOUTS = ["contiguous", "bhnd-transposed", "sliced", "expanded", "channels-last", "last-dim-strided"]
VALUES = ["normal", "small", "huge", "denormal", "special"]
# Largest |v| per dtype for "huge" values: the output is a weighted mean of v, so it stays finite,
# and the fp32 sums phi(q) . S (|q| |k| |v| Dk with q, k up to 1e4) stay below fp32's 3.4e38: bf16
# at 1e30 overflowed them at Dk = 128 (a random-seed run: inf on native and Triton), the op's
# documented range, not a kernel defect.
HUGE = {torch.float32: 1e15, torch.float64: 1e100, torch.float16: 3e4, torch.bfloat16: 1e28}


def _layout(t: torch.Tensor, layout: str, rng: torch.Generator) -> torch.Tensor:
    """The same (B, N, H, D) values with the strides a user might produce."""
    b, n, h, d = t.shape
    if layout == "bhnd-transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        wide = torch.empty(b, n, h, d + 5, dtype=t.dtype)
        wide[..., 2:2 + d] = t
        return wide[..., 2:2 + d]
    if layout == "expanded" and n > 0:  # stride 0 along N: every token is token 0
        return t[:, :1].expand(b, n, h, d)
    if layout == "channels-last":
        return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    if layout == "last-dim-strided":
        wide = torch.empty(b, n, h, 2 * d, dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _values(shape, dtype, kind, is_v, rng):
    x = torch.randn(shape, generator=rng, dtype=torch.float64)
    if kind == "small":
        x = x * 1e-3
    elif kind == "huge":
        # q, k up to 1e4 (phi(q) S stays finite in fp32), v up to the dtype's HUGE.
        x = x * (HUGE[dtype] if is_v else 1e4) / 4
    elif kind == "denormal":
        mask = torch.rand(shape, generator=rng) < 0.3
        x = torch.where(mask, x * 1e-40 if dtype != torch.float64 else x * 1e-310, x)
    elif kind == "special" and x.numel() > 0:
        flat = x.view(-1)
        for _ in range(int(torch.randint(1, 3, (1,), generator=rng))):
            position = int(torch.randint(0, flat.numel(), (1,), generator=rng))
            flat[position] = [float("nan"), float("inf"), float("-inf")][int(torch.randint(0, 3, (1,), generator=rng))]
    return x.to(dtype)


@st.composite
def cases(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtypes = [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if backend != "triton" else [])
    dims = st.one_of(st.integers(1, 70), st.sampled_from([128, 160, 256]))
    return dict(
        backend=backend, dtype=draw(st.sampled_from(dtypes)),
        shape=(draw(st.integers(0, 2)), draw(st.one_of(st.integers(1, 80), st.just(300))), draw(st.integers(0, 3)),
               draw(dims), draw(dims)),
        layout=draw(st.sampled_from(LAYOUTS)), values=draw(st.sampled_from(VALUES)),
        feature_map=draw(st.sampled_from(["elu1", "relu", "none"])), eps=draw(st.sampled_from([1e-4, 0.0, 0.5])),
        seed=draw(st.integers(0, 2**31 - 1)))


def _inputs(case):
    b, n, h, dk, dv = case["shape"]
    rng = torch.Generator().manual_seed(case["seed"])
    q, k = (_values((b, n, h, dk), case["dtype"], case["values"], False, rng) for _ in range(2))
    v = _values((b, n, h, dv), case["dtype"], case["values"], True, rng)
    if case["feature_map"] == "none":  # phi(q) . m must stay away from 0 (ill-conditioned otherwise)
        q, k = q.abs() + 0.1, k.abs() + 0.1
    if case["eps"] == 0.0 and case["feature_map"] == "relu":  # relu can zero a whole row: 0 / 0
        case["eps"] = 1e-4
    if case["eps"] == 0.0 and case["feature_map"] == "elu1":
        # exp(x) underflows to 0 below about -87 in fp32 (the kernels' compute dtype for every
        # input but fp64; the reference computes in fp64): with eps = 0 such a query is 0 / 0 =
        # NaN in the kernels and finite in the reference. Keep q, k where phi is representable.
        q, k = q.clamp(min=-80), k.clamp(min=-80)
    return [_layout(t, case["layout"], rng) for t in (q, k, v)]


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype, scale_factor=2.0, what="", magnitude=0.0):
    """Same NaN pattern; elsewhere within the dtype's tolerance, relative to the largest finite
    reference value or `magnitude` if larger (sums over tokens and dims make errors relative to
    the whole output; a gradient that cancels to ~0 rounds relative to the call's others)."""
    got, want = got.detach().cpu().double(), want.detach().double()
    assert got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at {got.isnan().nonzero().tolist()[:8]}, " \
                                                   f"reference {want.isnan().nonzero().tolist()[:8]}"
    finite = want.isfinite()
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()]), f"{what}: infinities differ"
    if finite.any():
        atol, rtol = TOLERANCES[dtype]
        scale = max(want[finite].abs().max().item(), magnitude)  # no floor at 1: small gradients passed as zeros
        torch.testing.assert_close(got[finite], want[finite], atol=atol * scale * scale_factor + 2 * subnormal_step(dtype),
                                   rtol=rtol * scale_factor, msg=what)


def _reference_and_grads(q, k, v, grad_out, eps, feature_map):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference.linear_attention_ref(*leaves, eps, feature_map)
    grads = torch.autograd.grad(out, leaves, grad_out.double(), allow_unused=True) if out.numel() else (None,) * 3
    return out, grads


def check_forward_and_backward(case):
    q, k, v = _inputs(case)
    device, dtype = DEVICES[case["backend"]], case["dtype"]
    q, k, v = [t.to(device).requires_grad_() for t in (q, k, v)]
    out = linear_attention(q, k, v, eps=case["eps"], feature_map=case["feature_map"], backend=case["backend"])
    expected, expected_grads = _reference_and_grads(q, k, v, torch.ones(out.shape, dtype=dtype), case["eps"],
                                                    case["feature_map"])
    assert out.dtype == dtype and out.is_contiguous()
    # out is a weighted mean of v's rows: its rounding is relative to v's size
    finite_v = v.detach().double()[v.detach().isfinite()]
    assert_matches(out, expected.to(dtype), dtype, what="out",
                   magnitude=finite_v.abs().max().item() if finite_v.numel() else 0.0)
    if out.numel() == 0 or case["values"] == "huge":
        return  # gradients of huge values overflow fp32 by design (phi'(k) v dS ~ 1e34)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    sizes = [w[w.isfinite()].abs().max().item() if w is not None and w.isfinite().any() else 0.0
             for w in expected_grads]
    for name, got, want, size in zip("qkv", grads, expected_grads, sizes):
        assert_matches(got, want.to(dtype), dtype, scale_factor=8.0, what=f"d{name}",
                       magnitude=gradient_scale(size, max(sizes)))


@FUZZ
@given(cases())
def test_fuzz_forward_and_backward_match_the_reference(case):
    check_forward_and_backward(case)


@FUZZ
@given(cases())
def test_fuzz_state_and_apply_match_the_reference(case):
    q, k, v = _inputs(case)
    device, backend, fm = DEVICES[case["backend"]], case["backend"], case["feature_map"]
    state, mean = linear_attention_state(k.to(device), v.to(device), feature_map=fm, backend=backend)
    expected_state, expected_mean = reference.linear_attention_state_ref(k, v, fm)
    accumulation = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    assert state.dtype == mean.dtype == accumulation
    assert_matches(state, expected_state, case["dtype"], what="state")
    assert_matches(mean, expected_mean, case["dtype"], what="mean")
    out = linear_attention_apply(q.to(device), expected_state.to(device), expected_mean.to(device),
                                 eps=case["eps"], feature_map=fm, backend=backend)
    assert_matches(out, reference.linear_attention_apply_ref(q, expected_state, expected_mean, case["eps"], fm),
                   case["dtype"], what="apply")


@FUZZ
@given(cases())
def test_fuzz_results_are_identical_run_to_run(case):
    q, k, v = [t.to(DEVICES[case["backend"]]) for t in _inputs(case)]
    run = lambda: linear_attention(q, k, v, eps=case["eps"], feature_map=case["feature_map"],  # noqa: E731
                                   backend=case["backend"])
    first, second = run(), run()
    assert torch.equal(first.isnan(), second.isnan())
    assert torch.equal(torch.nan_to_num(first), torch.nan_to_num(second))


# ---- bad inputs: a clear error, never a crash --------------------------------------------------

# Each mutation and what its message must say (every backend: the checks are shared).
EXPECTED_MESSAGES = {
    "rank": r"must be a 4-D \(B, N, H, D[kv]\) tensor, got shape",
    "batch": r"must (have the same \(B, N, H, Dk\) shape|agree in \(B, N, H\))",
    "tokens": r"must (have the same \(B, N, H, Dk\) shape|agree in \(B, N, H\))",
    "heads": r"must (have the same \(B, N, H, Dk\) shape|agree in \(B, N, H\))",
    "dk": r"q and k must have the same \(B, N, H, Dk\) shape",
    "dim-too-large": r"D[kv] \([kv]\.shape\[-1\]\) must be in \[1, 256\], got 257|same \(B, N, H, Dk\) shape",
    "dim-zero": r"D[kv] \([kv]\.shape\[-1\]\) must be in \[1, 256\], got 0|same \(B, N, H, Dk\) shape",
    "no-tokens": r"the sequence length N must be at least 1, got 0",
    "int-dtype": r"q must be float32, float16, bfloat16 or float64, got torch\.int32",
    "mixed-dtype": r"all inputs must have the same dtype",
    "mixed-device": r"all inputs must have the same device",
    "feature-map": r"feature_map must be one of \('none', 'elu1', 'relu'\), got 'softmax'",
    "eps": r"eps must be a finite number >= 0, got",
}
MUTATIONS = list(EXPECTED_MESSAGES)


@st.composite
def bad_cases(draw):
    return dict(backend=draw(st.sampled_from(BACKENDS + ["torch.ops"])), mutation=draw(st.sampled_from(MUTATIONS)),
                shape=(draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 3)),
                       draw(st.integers(1, 9)), draw(st.integers(1, 9))),
                which=draw(st.integers(0, 2)))


def _bad_inputs(case):
    b, n, h, dk, dv = case["shape"]
    q, k, v = torch.randn(b, n, h, dk), torch.randn(b, n, h, dk), torch.randn(b, n, h, dv)
    tensors, eps, fm = [q, k, v], 1e-4, "elu1"
    i, mutation = case["which"], case["mutation"]
    grow = lambda t, dim: torch.randn(*(s + (1 if j == dim else 0) for j, s in enumerate(t.shape)))  # noqa: E731
    if mutation == "rank":
        tensors[i] = tensors[i].flatten(2) if i != 1 else tensors[i][None]
    elif mutation in ("batch", "tokens", "heads"):
        tensors[i] = grow(tensors[i], ["batch", "tokens", "heads"].index(mutation))
    elif mutation == "dk":
        tensors[i % 2] = grow(tensors[i % 2], 3)
    elif mutation == "dim-too-large":
        tensors[i] = torch.randn(b, n, h, 257)
    elif mutation == "dim-zero":
        tensors[i] = torch.randn(b, n, h, 0)
    elif mutation == "no-tokens":
        tensors = [t[:, :0] for t in tensors]
    elif mutation == "int-dtype":
        tensors = [t.to(torch.int32) for t in tensors]
    elif mutation == "mixed-dtype":
        tensors[i] = tensors[i].half()
    elif mutation == "mixed-device":
        tensors[i] = tensors[i].to("meta")
    elif mutation == "feature-map":
        fm = "softmax"
    else:
        eps = [-1.0, float("nan"), float("inf")][i]
    return tensors, eps, fm


@FUZZ
@given(bad_cases())
def test_fuzz_bad_inputs_raise_clear_errors(case):
    (q, k, v), eps, fm = _bad_inputs(case)
    if case["backend"] == "torch.ops":
        call = lambda: torch.ops.mmfast.linear_attention(q, k, v, eps, fm)  # noqa: E731
    else:
        device = DEVICES[case["backend"]]
        q, k, v = [t if t.device.type == "meta" else t.to(device) for t in (q, k, v)]
        call = lambda: linear_attention(q, k, v, eps=eps, feature_map=fm, backend=case["backend"])  # noqa: E731
    with pytest.raises((ValueError, TypeError), match="^linear_attention: ") as error:
        call()
    assert re.search(EXPECTED_MESSAGES[case["mutation"]], str(error.value)), str(error.value)


# ---- regressions: the shrunk examples of failures the fuzz suite found --------------------------


def test_regression_reference_backend_returns_contiguous_outputs():
    """Found by the fuzz suite: (B, H, N, D)-transposed inputs gave a non-contiguous output on
    the reference backend (einsum's layout), unlike every other backend and the fake kernels."""
    check_forward_and_backward(dict(backend="reference", dtype=torch.float32, shape=(1, 2, 2, 1, 1),
                                    layout="bhnd-transposed", values="normal", feature_map="elu1", eps=1e-4, seed=0))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_regression_triton_keeps_bf16_denormals():
    """Found by the fuzz suite: a bf16 denormal q (9e-41 > 0) had relu gradient 0 on the Triton
    backend, because the interpreter's bf16 -> fp32 conversion flushed it to zero."""
    check_forward_and_backward(dict(backend="triton", dtype=torch.bfloat16, shape=(1, 300, 1, 1, 1),
                                    layout="contiguous", values="denormal", feature_map="relu", eps=1e-4, seed=0))
