"""The helpers every Triton op family shares (python/mmfast/triton/_common.py), where the
interpreter and a GPU differ: the fp32 -> bf16 rounding of stored outputs and the hi + lo
split of an fp32 dot operand."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mmfast.triton._common import divide, dot_operand, output_value, split_dot  # noqa: E402

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
def _dot_kernel(a_ptr, b_ptr, c_ptr, DOT_PREC: tl.constexpr, SPLIT_A: tl.constexpr, PLAIN: tl.constexpr,
                M: tl.constexpr):
    """c = a @ b by split_dot, or (PLAIN) by one tf32 dot of operands as a GPU reads them."""
    rows = tl.arange(0, M)
    a = tl.load(a_ptr + rows[:, None] * M + rows[None, :])
    b = tl.load(b_ptr + rows[:, None] * M + rows[None, :])
    if PLAIN:
        c = tl.dot(dot_operand(a, "tf32"), dot_operand(b, "tf32"), input_precision="tf32")
    else:
        c = split_dot(a, b, None, DOT_PREC, SPLIT_A)
    tl.store(c_ptr + rows[:, None] * M + rows[None, :], c)


def _dot(a, b, precision="tf32", split_a=True, plain=False):
    c = torch.empty(a.shape[0], b.shape[1], device=TRITON_DEVICE)
    _dot_kernel[(1,)](a.to(TRITON_DEVICE), b.to(TRITON_DEVICE), c, DOT_PREC=precision, SPLIT_A=split_a, PLAIN=plain,
                      M=a.shape[0])
    return c.cpu()


def _operands(split_a: bool, m: int = 16):
    """An fp16-valued operand (exact in tf32) and an fp32 one, in the order split_dot takes."""
    torch.manual_seed(0)
    exact = torch.randn(m, m).half().float()
    fp32 = torch.randn(m, m) * (1 + torch.rand(m, m))
    return (fp32, exact) if split_a else (exact, fp32)


@pytest.mark.parametrize("split_a", [True, False])
def test_split_dot_keeps_fp32_accuracy_with_one_exact_operand(split_a):
    """Split as hi + lo, the product is good to about 2^-20 of its terms; one tf32 dot of the
    same operands (as a GPU reads them; under the interpreter dot_operand truncates them) is off
    by about 2^-11: what the split removes."""
    a, b = _operands(split_a)
    want = a.double() @ b.double()
    terms = a.double().abs() @ b.double().abs()
    error = {name: ((got.double() - want).abs() / terms).max().item()
             for name, got in (("split", _dot(a, b, split_a=split_a)), ("ieee", _dot(a, b, "ieee", split_a)),
                               ("plain tf32", _dot(a, b, plain=True)))}
    assert error["split"] < 2**-19 and error["ieee"] < 2**-20, error
    assert error["plain tf32"] > 2**-14, error


@pytest.mark.parametrize("split_a", [True, False])
def test_split_dot_keeps_inf_and_nan(split_a):
    """An infinite entry of the split operand is its own hi (its lo 0, not inf - inf = NaN): the
    product is inf where a finite one would be, NaN where inf meets 0 or a NaN is summed in."""
    a, b = _operands(split_a, m=16)
    fp32 = a if split_a else b
    exact = b if split_a else a
    fp32[0, 0], fp32[1, 0], fp32[2, 3] = float("inf"), float("-inf"), float("nan")
    if split_a:
        exact[0, 5] = 0.0  # inf * 0 = NaN in (0, 5)
    else:
        exact[5, 0] = 0.0  # row 5 meets the inf of column 0 with 0
    want = a.double() @ b.double()
    got = _dot(a, b, split_a=split_a).double()
    assert torch.equal(got.isnan(), want.isnan()), (got.isnan().nonzero().tolist(), want.isnan().nonzero().tolist())
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[got.isinf()], want[want.isinf()])
    assert want.isinf().any() and want.isnan().any()  # the case holds both


@triton.jit
def _divide_kernel(x_ptr, z_ptr, y_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows, cols = tl.arange(0, ROWS), tl.arange(0, COLS)
    x = tl.load(x_ptr + rows[:, None] * COLS + cols[None, :])
    tl.store(y_ptr + rows[:, None] * COLS + cols[None, :], divide(x, tl.load(z_ptr + rows)[:, None]))


def test_divide_is_correctly_rounded_and_broadcasts():
    """divide is div_rn (IEEE, as torch divides), with a per-row divisor broadcast over columns.
    The interpreter's '/' is IEEE too: on CPU this checks the broadcast and the special values;
    only on a GPU (where '/' is div.full.f32) does it tell div_rn from '/'."""
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(16, 32, generator=g) * 1e-10, torch.rand(16, generator=g) * 1e-3
    z[:3] = torch.tensor([1e-39, 3e-42, 0.0])  # subnormal divisors and a zero one (inf / NaN)
    y = torch.empty(16, 32, device=TRITON_DEVICE)
    _divide_kernel[(1,)](x.to(TRITON_DEVICE), z.to(TRITON_DEVICE), y, 16, 32)
    assert torch.equal(y.cpu(), x / z[:, None])


def test_linear_attention_chunk_count_with_no_programs(monkeypatch):
    """Found by a Triton review: B = 0 or H = 0 gave ZeroDivisionError on a GPU (programs per
    chunk 0); the interpreter takes a fixed chunk and never saw it."""
    from mmfast.triton import linear_attention as la

    monkeypatch.setattr(la, "device_sm_count", lambda device: 132)
    assert la._chunk_size(5000, 0, torch.device("cuda")) % la._BLOCK_N == 0


def test_extents_past_int32_are_refused_before_a_launch():
    """The kernels index rows / pixels as program id * block + lane in int32: past 2^31 the
    products would wrap and pass the bounds masks (found by an overflow review)."""
    import mmfast.triton  # noqa: F401  (registers the ops)

    ns = torch.ops.mmfast_triton
    huge = torch.zeros(1, 1, 1, 1, device=TRITON_DEVICE).expand(1, 2**31, 1, 1)  # no memory behind it
    with pytest.raises(ValueError, match=r"linear_attention: the triton backend indexes tokens in int32, at most "
                                         r"2147479552, got 2147483648; use backend='native'"):
        ns.linear_attention(huge, huge, huge, 1e-4, "elu1")
    with pytest.raises(ValueError, match="linear_attention_state: the triton backend indexes tokens in int32"):
        ns.linear_attention_state(huge, huge, "elu1")
    with pytest.raises(ValueError, match="vq_quantize: the triton backend indexes rows of z and codes in int32"):
        ns.vq_quantize(huge.view(2**31, 1), torch.zeros(3, 1, device=TRITON_DEVICE), None)
    codes, mask = torch.zeros(1, dtype=torch.int64), torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="masked_conv2d: the triton backend indexes pixels in int32"):
        ns.masked_conv2d(huge.view(1, 1, 2**16, 2**15), torch.zeros(1, 1, 1, 1, 1), None, codes.to(TRITON_DEVICE),
                         mask.to(TRITON_DEVICE), mask.to(TRITON_DEVICE), [1, 1], [0, 0], [1, 1])
