"""torch.func and forward-mode AD around mmfast's ops (found by an op-level trial: jvp gave a
silent zero tangent, forward_ad none, grad a misleading autograd.Function error). The
differentiating transforms raise a NotImplementedError that names the alternatives; vmap and
reverse mode work, and torch.autograd.functional.jvp (reverse mode twice) gives the JVP."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from mmfast import reference
from mmfast.ops import (decode_attention, decode_linear, linear_attention, masked_conv2d, masked_group_norm,
                        masked_linear, vq_dequantize, vq_quantize)

torch.manual_seed(0)
_F64 = dict(dtype=torch.float64)
_CODES, _MASK = torch.tensor([0, 1]), torch.tensor([[True, True, False, True], [False, True, True, True]])
_Q = torch.randn(2, 5, 2, 4, **_F64)
_CACHE = torch.randn(2, 6, 2, 4, **_F64)
_CODEBOOK = torch.randn(7, 4, **_F64)
_CONV_W, _LINEAR_W, _DECODE_W = (torch.randn(2, 4, 4, 3, 3, **_F64), torch.randn(2, 4, 2, **_F64),
                                 torch.randn(3, 8, **_F64))

# op name -> f(x) of one differentiable float input x (the others fixed)
OPS = {
    "linear_attention": lambda x: linear_attention(x, _Q, _Q),
    "vq_quantize": lambda x: vq_quantize(x, _CODEBOOK, return_distance=True)[1],
    "vq_dequantize": lambda x: vq_dequantize(torch.tensor([[1, 3]]), x.reshape(-1, 4)[:7]),
    "masked_conv2d": lambda x: masked_conv2d(x.reshape(2, 4, 5, 2), _CONV_W, None, _CODES, _MASK, _MASK, padding=1),
    "masked_linear": lambda x: masked_linear(x.reshape(2, 20, 2), _LINEAR_W, None, _CODES,
                                             torch.ones(2, 2, dtype=torch.bool), _MASK),
    "masked_group_norm": lambda x: masked_group_norm(x.reshape(2, 4, 10), None, None, 2, _CODES, _MASK),
    "decode_linear": lambda x: decode_linear(x.reshape(10, 8), _DECODE_W),
    "decode_attention": lambda x: decode_attention(x[:, :1], _CACHE, _CACHE, torch.tensor([4, 6], dtype=torch.int32)),
}


@pytest.mark.parametrize("op", list(OPS))
def test_differentiating_transforms_raise_and_vmap_works(op):
    f, x = OPS[op], torch.randn(2, 5, 2, 4, **_F64)
    with pytest.raises(NotImplementedError, match=f"{op}: torch.func's differentiating transforms"):
        torch.func.grad(lambda t: f(t).sum())(x)
    with pytest.raises(NotImplementedError, match=f"{op}: torch.func's differentiating transforms"):
        torch.func.jvp(f, (x,), (torch.ones_like(x),))
    with forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match=f"{op}: forward-mode AD"):
            f(forward_ad.make_dual(x, torch.ones_like(x)))
        torch.testing.assert_close(f(x), f(x.clone()))  # no tangent: runs
    stacked = torch.stack([x, 2 * x])
    torch.testing.assert_close(torch.func.vmap(f)(stacked), torch.stack([f(x), f(2 * x)]))


def test_reverse_mode_jvp_is_the_references():
    x, tangent = torch.randn(2, 5, 2, 4, **_F64), torch.randn(2, 5, 2, 4, **_F64)
    _, got = torch.autograd.functional.jvp(OPS["linear_attention"], x, tangent)
    _, expected = torch.func.jvp(lambda t: reference.linear_attention_ref(t, _Q, _Q), (x,), (tangent,))
    torch.testing.assert_close(got, expected)
