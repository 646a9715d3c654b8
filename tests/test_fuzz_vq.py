"""Property-based tests (hypothesis) of the VQ ops on every backend here: random sizes (0- and
1-sized, odd), row strides, dtypes, values (huge, tiny, denormal, NaN, Inf, duplicate codes)
against the fp64 reference, run-to-run identity, and random bad inputs, which must raise with
a message. Same budget rules as tests/test_fuzz_linear_attention.py (MMFAST_FUZZ_EXAMPLES,
MMFAST_FUZZ_RANDOM)."""
from __future__ import annotations


import re

import pytest
import torch

from mmfast import reference
from mmfast.ops import vq_dequantize, vq_quantize

from _utils import HAS_TRITON, TRITON_DEVICE, fuzz_settings

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = fuzz_settings()

# The kernels only: the reference backend is mmfast.reference, the oracle itself (a third of the
# examples compared it with itself); its own unit tests cover its layouts and dtypes.
BACKENDS = ["native"] + (["triton"] if HAS_TRITON else [])
DEVICES = {"native": "cpu", "reference": "cpu", "triton": TRITON_DEVICE}
VALUES = ["normal", "huge", "tiny", "denormal", "special", "duplicates"]
HUGE = {torch.float32: 1e15, torch.float64: 1e100, torch.float16: 100.0, torch.bfloat16: 1e15}


@st.composite
def cases(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtypes = [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if backend != "triton" else [])
    return dict(backend=backend, dtype=draw(st.sampled_from(dtypes)), n=draw(st.integers(0, 150)),
                k=draw(st.one_of(st.integers(1, 150), st.just(1000))), d=draw(st.one_of(st.integers(1, 40),
                                                                                       st.just(256))),
                stride_pad=draw(st.sampled_from([0, 3])), values=draw(st.sampled_from(VALUES)),
                metric=draw(st.sampled_from(["l2", "cosine"])), seed=draw(st.integers(0, 2**31 - 1)))


def _inputs(case):
    rng = torch.Generator().manual_seed(case["seed"])
    n, k, d, dtype = case["n"], case["k"], case["d"], case["dtype"]
    wide = torch.randn(n, d + case["stride_pad"], generator=rng, dtype=torch.float64)
    codebook = torch.randn(k, d, generator=rng, dtype=torch.float64)
    kind = case["values"]
    if kind == "huge":
        wide, codebook = wide * HUGE[dtype] ** 0.5 / 4, codebook * HUGE[dtype] ** 0.5 / 4
    elif kind == "tiny":
        wide, codebook = wide * 1e-3, codebook * 1e-3
    elif kind == "denormal":
        wide = torch.where(torch.rand(wide.shape, generator=rng) < 0.3, wide * 1e-40, wide)
    elif kind == "special" and wide.numel():
        wide.view(-1)[int(torch.randint(0, wide.numel(), (1,), generator=rng))] = float("nan")
        wide.view(-1)[int(torch.randint(0, wide.numel(), (1,), generator=rng))] = float("inf")
    elif kind == "duplicates" and n:
        codebook = codebook[torch.randint(0, max(1, k // 2), (k,), generator=rng)]  # equal codes: ties
        wide[:, :d] = codebook[torch.randint(0, k, (n,), generator=rng)]  # rows on codes: exact ties
    z = wide.to(dtype)[:, :d]
    return z, codebook.to(dtype)


def _check(case):
    z, codebook = _inputs(case)
    device = DEVICES[case["backend"]]
    indices, distance = vq_quantize(z.to(device), codebook.to(device), metric=case["metric"], return_distance=True,
                                    backend=case["backend"])
    want_indices, want_distance = reference.vq_quantize_ref(z, codebook, case["metric"])
    indices, distance = indices.cpu(), distance.cpu().double()
    assert indices.shape == want_indices.shape and indices.dtype == torch.int64
    assert bool(((indices >= 0) & (indices < codebook.shape[0])).all())
    assert torch.equal(distance.isnan(), want_distance.isnan().cpu())
    finite = want_distance.isfinite()
    assert torch.equal(distance[~finite & ~distance.isnan()], want_distance.double()[~finite & ~distance.isnan()])
    # The chosen code's exact distance is the minimum within the rounding of the dots.
    rows = z.double().reshape(-1, z.shape[-1])
    codes = codebook.double()
    if case["metric"] == "cosine":
        rows, codes = (torch.nn.functional.normalize(t, dim=-1) for t in (rows, codes))
    chosen = (rows - codes[indices]).pow(2).sum(-1)
    scale = rows.pow(2).sum(-1) + codes.pow(2).sum(-1).max() + 1
    tol = (1e-10 if case["dtype"] == torch.float64 else 2e-5) * scale * rows.shape[-1] ** 0.5
    assert bool((chosen[finite] <= want_distance.double()[finite] + tol[finite]).all())
    assert bool(((distance[finite] - want_distance.double()[finite]).abs() <= tol[finite]).all())
    if case["values"] == "duplicates" and case["dtype"] == torch.float64 and case["metric"] == "l2":
        assert torch.equal(indices, want_indices)  # exact ties: the lowest index


@FUZZ
@given(cases())
def test_fuzz_quantize_matches_the_reference(case):
    _check(case)


@FUZZ
@given(cases())
def test_fuzz_dequantize_and_run_to_run(case):
    z, codebook = _inputs(case)
    device = DEVICES[case["backend"]]
    z, codebook = z.to(device), codebook.to(device)
    first = vq_quantize(z, codebook, metric=case["metric"], backend=case["backend"])
    assert torch.equal(first, vq_quantize(z, codebook, metric=case["metric"], backend=case["backend"]))
    rows = vq_dequantize(first, codebook, backend=case["backend"])
    assert torch.equal(rows.cpu(), codebook.cpu()[first.cpu()])


# Each mutation and what its message must say (every backend).
EXPECTED_MESSAGES = {
    "rank": r"^vq_quantize: codebook must be a 2-D \(K, D\) tensor, got shape",
    "dims": r"^vq_quantize: z's last dim must equal the codebook's D = \d+, got z of shape",
    "empty-codebook": r"^vq_quantize: codebook must hold at least one code of at least one dim, got shape",
    "int-dtype": r"^vq_quantize: (z|codebook) must be float32, float16, bfloat16 or float64, got torch\.int32",
    "mixed-dtype": r"^vq_quantize: all inputs must have the same dtype, got z: torch\.float64, codebook: torch\.float32",
    "mixed-device": r"^vq_quantize: all inputs must have the same device, got z: meta, codebook: cpu",
    "metric": r"^vq_quantize: metric must be one of \('l2', 'cosine'\), got 'manhattan'",
    "sqnorm-shape": r"^vq_quantize: codebook_sqnorm must be \(\d+,\), got",
    "index-range": r"^vq_dequantize: index \d+ is out of range for a codebook of \d+ codes",
    "index-dtype": r"^vq_dequantize: indices must be int64 or int32, got torch\.float32",
}
BAD = list(EXPECTED_MESSAGES)


@FUZZ
@given(st.sampled_from(BACKENDS + ["torch.ops"]), st.sampled_from(BAD), st.integers(1, 20), st.integers(1, 9))
def test_fuzz_bad_inputs_raise_clear_errors(backend, mutation, k, d):
    hypothesis.assume(not (backend == "torch.ops" and mutation == "metric"))  # the op has no metric argument
    z, codebook, kwargs = torch.randn(5, d), torch.randn(k, d), {}
    if mutation == "rank":
        codebook = codebook[None]
    elif mutation == "dims":
        z = torch.randn(5, d + 1)
    elif mutation == "empty-codebook":
        codebook = codebook[:0]
    elif mutation == "int-dtype":
        z, codebook = z.int(), codebook.int()
    elif mutation == "mixed-dtype":
        z = z.double()
    elif mutation == "mixed-device":
        z = z.to("meta")
    elif mutation == "metric":
        kwargs["metric"] = "manhattan"
    elif mutation == "sqnorm-shape":
        kwargs["codebook_sqnorm"] = torch.ones(k + 1)
    expected = (ValueError, TypeError, IndexError)
    with pytest.raises(expected) as error:
        if mutation in ("index-range", "index-dtype"):
            indices = torch.tensor([0, k]) if mutation == "index-range" else torch.zeros(2)
            if backend == "torch.ops":
                torch.ops.mmfast.vq_dequantize(indices, codebook, False)
            else:
                vq_dequantize(indices.to(DEVICES[backend]), codebook.to(DEVICES[backend]), backend=backend)
        elif backend == "torch.ops":
            torch.ops.mmfast.vq_quantize(z.reshape(-1, z.shape[-1]), codebook, kwargs.get("codebook_sqnorm"))
        else:
            device = DEVICES[backend]
            z = z if z.device.type == "meta" else z.to(device)
            vq_quantize(z, codebook.to(device), backend=backend, **kwargs)
    assert re.search(EXPECTED_MESSAGES[mutation], str(error.value)), str(error.value)


# ---- regressions: the shrunk examples of failures the fuzz suite found -------------------------


def test_regression_cosine_searches_unit_vectors_in_fp32():
    """Found by the fuzz suite: for bf16 inputs the cosine path rounded the unit vectors back to
    bf16, moving distances by 2e-4 (relative 5e-2); it now searches them in fp32."""
    _check(dict(backend="native", dtype=torch.bfloat16, n=1, k=1000, d=3, stride_pad=0, values="normal",
                metric="cosine", seed=0))


def test_regression_reference_breaks_exact_ties_to_the_lowest_index():
    """Found by the fuzz suite: the reference's fp64 GEMM (||z||^2 + ||e||^2 - 2 z.e) rounded
    equal codes differently by position and picked code 16 over its equal code 2."""
    _check(dict(backend="native", dtype=torch.float64, n=4, k=19, d=256, stride_pad=0, values="duplicates",
                metric="l2", seed=0))
