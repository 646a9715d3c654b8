"""Property-based tests (hypothesis) of the masked-channel ops on the native CPU backend: random
batch / channel / spatial sizes (0- and 1-sized, odd), codes (int64 / int32, unsorted, repeated,
unused), masks (empty, full, partial groups), shared or per-code weights, conv geometry, dtypes
and layouts (channels_last, transposed tokens) against the fp64 reference at the dtype's
tolerance; masked outputs exactly 0. Gradients are checked in tests/test_pruned.py (gradcheck).
Budget rules: tests/_utils.fuzz_settings."""
from __future__ import annotations

import pytest
import torch

from mmfast import reference
from mmfast.ops import masked_conv2d, masked_group_norm, masked_linear

from _utils import assert_close, fuzz_settings

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = fuzz_settings()
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def routing(draw, in_channels, out_channels):
    batch, codes = draw(st.integers(0, 6)), draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    keep_in, keep_out = draw(st.sampled_from([0.0, 0.5, 1.0])), draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    code_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    return dict(batch=batch, generator=g, sample_codes=torch.randint(0, codes, (batch,), generator=g).to(code_dtype),
                in_mask=torch.rand(codes, in_channels, generator=g) < keep_in,
                out_mask=torch.rand(codes, out_channels, generator=g) < keep_out,
                stacked=draw(st.sampled_from([1, codes])), dtype=draw(st.sampled_from(DTYPES)))


def _check(y, expected, dtype, out_mask, sample_codes, channel_dim=1):
    assert_close(y, expected, dtype)
    assert (y.transpose(1, channel_dim)[~out_mask[sample_codes.long()]] == 0).all()


@FUZZ
@given(data=st.data(), cin=st.integers(0, 17), cout=st.integers(0, 17), kernel=st.sampled_from([1, 2, 3]),
       stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 2), h=st.integers(1, 9),
       w=st.integers(1, 9))
def test_masked_conv2d_matches_the_reference(data, cin, cout, kernel, stride, padding, dilation, h, w):
    hypothesis.assume(h + 2 * padding >= dilation * (kernel - 1) + 1 and w + 2 * padding >= dilation * (kernel - 1) + 1)
    r = data.draw(routing(cin, cout))
    g, dtype = r["generator"], r["dtype"]
    x = torch.randn(r["batch"], cin, h, w, generator=g).to(dtype)
    if data.draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(r["stacked"], cout, cin, kernel, kernel, generator=g).to(dtype)
    bias = torch.randn(r["stacked"], cout, generator=g).to(dtype) if data.draw(st.booleans()) else None
    args = (x, weight, bias, r["sample_codes"], r["in_mask"], r["out_mask"])
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    y = masked_conv2d(*args, **conv)
    expected = reference.masked_conv2d_ref(x.double(), weight.double(), None if bias is None else bias.double(),
                                           *args[3:], (stride,) * 2, (padding,) * 2, (dilation,) * 2)
    _check(y, expected, dtype, r["out_mask"], r["sample_codes"])


@FUZZ
@given(data=st.data(), cin=st.integers(0, 33), cout=st.integers(0, 33), tokens=st.integers(0, 12))
def test_masked_linear_matches_the_reference(data, cin, cout, tokens):
    r = data.draw(routing(cin, cout))
    g, dtype = r["generator"], r["dtype"]
    x = torch.randn(r["batch"], tokens, cin, generator=g).to(dtype)
    if data.draw(st.booleans()):
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    weight = torch.randn(r["stacked"], cout, cin, generator=g).to(dtype)
    bias = torch.randn(r["stacked"], cout, generator=g).to(dtype) if data.draw(st.booleans()) else None
    args = (x, weight, bias, r["sample_codes"], r["in_mask"], r["out_mask"])
    y = masked_linear(*args)
    expected = reference.masked_linear_ref(x.double(), weight.double(), None if bias is None else bias.double(),
                                           *args[3:])
    _check(y, expected, dtype, r["out_mask"], r["sample_codes"], channel_dim=2)


@FUZZ
@given(data=st.data(), groups=st.integers(1, 6), per_group=st.integers(1, 7), plane=st.integers(1, 40),
       affine=st.sampled_from(["none", "shared", "per-code"]), silu=st.booleans())
def test_masked_group_norm_matches_the_reference(data, groups, per_group, plane, affine, silu):
    channels = groups * per_group
    r = data.draw(routing(1, channels))
    g, dtype = r["generator"], r["dtype"]
    codes = r["in_mask"].shape[0]
    x = (torch.randn(r["batch"], channels, plane, generator=g) * 5 + 3).to(dtype)
    shape = {"shared": (channels,), "per-code": (codes, channels)}.get(affine)
    weight = None if shape is None else torch.randn(shape, generator=g).to(dtype)
    bias = None if shape is None else torch.randn(shape, generator=g).to(dtype)
    y = masked_group_norm(x, weight, bias, groups, r["sample_codes"], r["out_mask"],
                          activation="silu" if silu else None)
    double = (lambda t: None if t is None else t.double())
    expected = reference.masked_group_norm_ref(x.double(), double(weight), double(bias), groups, r["sample_codes"],
                                               r["out_mask"], 1e-5, silu)
    _check(y, expected, dtype, r["out_mask"], r["sample_codes"])
