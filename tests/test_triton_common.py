"""The helpers every Triton op family shares (python/mmfast/triton/_common.py), where the
interpreter and a GPU differ: the fp32 -> bf16 rounding of stored outputs and the hi + lo
split of an fp32 dot operand."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mmfast.triton import _common  # noqa: E402
from mmfast.triton._common import output_value, split_dot, tf32_high  # noqa: E402

from _utils import TRITON_DEVICE  # noqa: E402


@triton.jit
def _store_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, output_value(x, y_ptr), mask=offs < n)


def _bf16_bits(value: float) -> int:
    return torch.tensor(value, dtype=torch.float32).view(torch.int32).item() >> 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_output_value_rounds_to_nearest_even_as_torch(dtype):
    """Ties to even, just past a tie, subnormals, the overflow to inf, inf and NaN: as torch's
    conversion (and a GPU's cvt.rn). The interpreter's own fp32 -> bf16 cast truncates
    (1.03897 -> 1.03125 instead of 1.0390625) and garbles bf16 subnormals (3e-39 -> 1.8e-40)."""
    one = 1.0 + 2**-8  # halfway between two bf16 neighbours of 1: rounds to even (1.0)
    values = [1.03897, -1.03897, one, 1.0 + 3 * 2**-8, one + 2**-20, 3.0e-39, -5.0e-40, 1e-45,
              3.3961e38, 3.4e38, float("inf"), float("-inf"), 0.0, -0.0, 65504.0, 65520.0, 6e-8, 2.9e-8,
              float("nan")]
    x = torch.tensor(values, dtype=torch.float32, device=TRITON_DEVICE)
    y = torch.empty(len(values), dtype=dtype, device=TRITON_DEVICE)
    _store_kernel[(1,)](x, y, len(values), BLOCK=32)
    want = x.to(dtype)
    assert torch.equal(y.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(y[finite].cpu().view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want[finite].cpu().view(torch.int16 if dtype != torch.float32 else torch.int32)), \
        (y.tolist(), want.tolist())


@triton.jit
def _split_dot_kernel(a_ptr, b_ptr, c_ptr, DOT_PREC: tl.constexpr, SPLIT_A: tl.constexpr, M: tl.constexpr):
    rows = tl.arange(0, M)
    a = tl.load(a_ptr + rows[:, None] * M + rows[None, :])
    b = tl.load(b_ptr + rows[:, None] * M + rows[None, :])
    c = split_dot(a, b, None, DOT_PREC, SPLIT_A)
    tl.store(c_ptr + rows[:, None] * M + rows[None, :], c)


@triton.jit
def _high_kernel(x_ptr, hi_ptr, M: tl.constexpr):
    rows = tl.arange(0, M)
    tl.store(hi_ptr + rows, tf32_high(tl.load(x_ptr + rows)))


@pytest.mark.parametrize("split_a", [True, False])
def test_split_dot_keeps_fp32_accuracy_with_one_exact_operand(split_a):
    """An fp16-valued operand (exact in tf32) times an fp32 one: split as hi + lo the product is
    good to about 2^-20 of its terms, where one tf32 dot (the fp32 operand's low 13 bits
    dropped, as the interpreter models a GPU) is off by about 2^-10."""
    torch.manual_seed(0)
    m = 16
    exact = torch.randn(m, m).half().float()
    fp32 = torch.randn(m, m) * (1 + torch.rand(m, m))
    a, b = (fp32, exact) if split_a else (exact, fp32)
    want = a.double() @ b.double()
    terms = a.double().abs() @ b.double().abs()
    results = {}
    for precision in ("tf32", "ieee"):
        c = torch.empty(m, m, device=TRITON_DEVICE)
        _split_dot_kernel[(1,)](a.to(TRITON_DEVICE), b.to(TRITON_DEVICE), c, DOT_PREC=precision, SPLIT_A=split_a, M=m)
        results[precision] = ((c.cpu().double() - want).abs() / terms).max().item()
    assert results["tf32"] < 2**-19 and results["ieee"] < 2**-20, results
    if _common.INTERPRET:  # the interpreter's plain tf32 dot: operands truncated by dot_operand
        hi = torch.empty(m * m, device=TRITON_DEVICE)
        _high_kernel[(1,)](fp32.reshape(-1).to(TRITON_DEVICE), hi, M=m * m)
        one_dot = (exact.double() @ hi.cpu().double().reshape(m, m)) if not split_a else \
            (hi.cpu().double().reshape(m, m) @ exact.double())
        assert ((one_dot - want).abs() / terms).max().item() > 2**-14  # what the split removes
