"""PyTorch's transforms and autocast around mmfast's ops (found by an op-level trial: jvp gave a
silent zero tangent, forward_ad none, grad a misleading autograd.Function error; autocast
regions raised TypeError). On the compiled backends the differentiating transforms raise a
NotImplementedError that names the alternatives; the reference backend takes them; vmap and
reverse mode work, and torch.autograd.functional.jvp (reverse mode twice) gives the JVP."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import mmfast
from mmfast import reference
from mmfast.ops import (decode_attention, decode_linear, kv_cache_append, linear_attention, masked_conv2d,
                        masked_group_norm, masked_linear, vq_dequantize, vq_quantize)

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
    outside = f(x)
    with forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match=f"{op}: forward-mode AD"):
            f(forward_ad.make_dual(x, torch.ones_like(x)))
        torch.testing.assert_close(f(x), outside)  # no tangent: runs, as outside the dual level
    stacked = torch.stack([x, 2 * x])
    torch.testing.assert_close(torch.func.vmap(f)(stacked), torch.stack([f(x), f(2 * x)]))
    with forward_ad.dual_level():  # vmap inside a dual level, no tangent on the op's inputs: runs
        torch.testing.assert_close(torch.func.vmap(f)(stacked), torch.stack([f(x), f(2 * x)]))
    with pytest.raises(NotImplementedError, match=f"{op}: torch.func's differentiating transforms"):
        torch.func.grad(lambda t: torch.func.vmap(f)(t).sum())(stacked)  # found beneath the vmap level


@pytest.mark.parametrize("op", ["linear_attention", "masked_group_norm", "decode_linear"])
def test_the_reference_backend_takes_every_transform(op):
    """backend='reference' is plain torch ops: torch.func.grad and jvp work on it (a review of the
    refusal above found it refused there too)."""
    with mmfast.use_backend("reference"):
        f, x = OPS[op], torch.randn(2, 5, 2, 4, **_F64)
        grad = torch.func.grad(lambda t: f(t).square().sum())(x)
        x_leaf = x.clone().requires_grad_()
        expected = torch.autograd.grad(f(x_leaf).square().sum(), x_leaf)[0]
        torch.testing.assert_close(grad, expected)
        tangent = torch.randn_like(x)
        _, got = torch.func.jvp(f, (x,), (tangent,))
        torch.testing.assert_close(got, torch.autograd.functional.jvp(f, x, tangent)[1])  # reverse mode twice


def test_reverse_mode_jvp_is_the_references():
    x, tangent = torch.randn(2, 5, 2, 4, **_F64), torch.randn(2, 5, 2, 4, **_F64)
    _, got = torch.autograd.functional.jvp(OPS["linear_attention"], x, tangent)
    _, expected = torch.func.jvp(lambda t: reference.linear_attention_ref(t, _Q, _Q), (x,), (tangent,))
    torch.testing.assert_close(got, expected)


# --- torch.autocast -------------------------------------------------------------------------------

_BF16 = torch.bfloat16


def _autocast_cases():
    """(op, f(*inputs), inputs with fp32 weights and bf16 activations, the policy's dtype)."""
    codes, mask = _CODES, _MASK
    ones = torch.ones(2, 4, dtype=torch.bool)
    conv_w, lin_w, gn_w = torch.randn(2, 4, 4, 3, 3), torch.randn(2, 4, 4), torch.randn(2, 4)
    x4, x3, q = torch.randn(2, 4, 5, 5).to(_BF16), torch.randn(2, 6, 4).to(_BF16), torch.randn(2, 6, 2, 8)
    lengths = torch.tensor([4, 6], dtype=torch.int32)
    return [
        ("masked_conv2d", lambda x, w: masked_conv2d(x, w, None, codes, mask, mask, padding=1), (x4, conv_w), _BF16),
        ("masked_linear", lambda x, w: masked_linear(x, w, None, codes, ones, mask), (x3, lin_w), _BF16),
        ("masked_group_norm", lambda x, w: masked_group_norm(x, w, None, 2, codes, mask), (x4, gn_w), torch.float32),
        ("decode_linear", lambda x, w: decode_linear(x, w), (x3.reshape(12, 4), lin_w[0]), _BF16),
        ("vq_quantize", lambda z, c: vq_quantize(z, c, return_distance=True)[1], (x3, lin_w[0]), torch.float32),
        ("linear_attention", lambda a, b: linear_attention(a, b, b), (q.to(_BF16), q), _BF16),
        # the static cache keeps its dtype (fp32 here): the queries follow it
        ("decode_attention", lambda q_, cache: decode_attention(q_, cache, cache, lengths),
         (q[:, :1].to(_BF16), torch.randn(2, 6, 2, 8)), torch.float32),
    ]


@pytest.mark.parametrize("case", _autocast_cases(), ids=lambda case: case[0])
def test_autocast_casts_inputs_as_torch_casts_its_ops(case):
    """Found by an op-level trial: under torch.autocast a bf16 activation met an fp32 weight and
    every mmfast op with a weight raised TypeError. Now each casts as torch casts the op of its
    kind: conv / linear / attention to the region's dtype,
    group_norm and cdist (VQ) to fp32 (torch's CUDA rule, on the CPU too), decode_attention's
    queries to the cache's dtype."""
    op, f, inputs, dtype = case
    with torch.autocast("cpu", dtype=_BF16):
        got = f(*inputs)
    expected = f(*(t.to(dtype) for t in inputs))  # outside the region: the casts by hand
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if op != "vq_quantize":  # its distances are in the accumulation dtype
        assert got.dtype == dtype
    with torch.autocast("cpu", dtype=_BF16, enabled=False):  # a disabled region: no cast
        with pytest.raises(TypeError, match="same dtype"):
            f(*inputs)
    f64 = [t.double() for t in inputs]  # fp64 is left alone, as torch leaves it
    with torch.autocast("cpu", dtype=_BF16):
        assert f(*f64).dtype in (torch.float64,)


def test_autocast_through_a_tiny_vqgan_and_aptp_unet():
    """The models that mix an activation with a parameter in one op run under autocast."""
    pytest.importorskip("diffusers")
    from mmfast.models.aptp import AptpUNet
    from mmfast.testing.tiny_aptp import tiny_experts, tiny_inputs
    from mmfast.testing.tiny_vqgan import tiny_vqgan

    vqgan = tiny_vqgan()
    images = torch.rand(1, 3, vqgan.config.resolution, vqgan.config.resolution) * 2 - 1
    with torch.no_grad():
        expected = vqgan.encode(images, progress=False)
        with torch.autocast("cpu", dtype=_BF16):
            codes = vqgan.encode(images, progress=False)
    assert codes.shape == expected.shape and codes.dtype == torch.int64
    assert (codes == expected).float().mean() >= 0.9  # bf16 moves a few vectors to a near code
    base, experts = tiny_experts(2, torch.Generator().manual_seed(1))
    unet = AptpUNet.from_experts(base, experts)
    sample, timestep, text = tiny_inputs(2)
    with torch.no_grad():
        reference_out = unet(sample, timestep, text, torch.tensor([0, 1])).sample
        with torch.autocast("cpu", dtype=_BF16):
            out = unet(sample, timestep, text, torch.tensor([0, 1])).sample
    assert out.isfinite().all()
    # bf16 through the UNet: 1e-2 of the scale measured
    assert (out.float() - reference_out).abs().max() <= 0.03 * reference_out.abs().max()


def test_autocast_through_a_liquid_generation():
    """decode_linear's bf16 outputs meet fp32 static caches: the appended tokens and the queries
    follow the caches' dtype (before: a TypeError at the first append)."""
    pytest.importorskip("transformers")
    from mmfast.models.liquid import generate_text
    from mmfast.testing.tiny_liquid import tiny_liquid_lm

    lm = tiny_liquid_lm("llama")
    prompts = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(0))
    lm.setup_caches(2, 32)
    expected = generate_text(lm, prompts, max_new_tokens=4, compile=False)
    with torch.autocast("cpu", dtype=_BF16):
        tokens = generate_text(lm, prompts, max_new_tokens=4, compile=False)
    assert tokens.shape == expected.shape and lm.model.layers[0].self_attn.kv_cache.k_cache.dtype == torch.float32
    logits = lm.prefill(prompts)  # the values under autocast: bf16 GEMMs, within bf16 rounding of fp32
    with torch.autocast("cpu", dtype=_BF16):
        mixed = lm.prefill(prompts)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, logits, rtol=0, atol=0.03 * logits.abs().max().item())  # 1.1e-2 measured
    assert not torch.equal(mixed, logits)  # autocast did run in bf16


def test_autocast_appends_new_tokens_in_the_caches_dtype():
    k_cache, v_cache = torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8)
    new = torch.randn(1, 1, 1, 8)
    with torch.autocast("cpu", dtype=_BF16):
        kv_cache_append(k_cache, v_cache, new.to(_BF16), new.to(_BF16), torch.zeros(1, dtype=torch.int32))
    assert torch.equal(k_cache[0, 0], new.to(_BF16).float()[0, 0])


# --- the tensor-free utility ops ------------------------------------------------------------------

_UTILITY_OPS = [("pruned_weight_cache", (-1, False)), ("cpu_output_pool", (-1, False)), ("cpu_amx_bf16", ()),
                ("cpu_avx512_bf16", ()), ("cpu_isa", ())]


@pytest.mark.skipif(not hasattr(torch.ops.mmfast, "cpu_isa"), reason="the native extension is not built")
@pytest.mark.parametrize("name, args", _UTILITY_OPS, ids=[name for name, _ in _UTILITY_OPS])
def test_utility_ops_pass_opcheck(name, args):
    """The registry's queries and settings (budget -1: read, change nothing) pass opcheck like the
    tensor ops; cpu_isa returns a str, which opcheck's AOT-dispatch comparison cannot compare."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        () if name == "cpu_isa" else ("test_aot_dispatch_dynamic",))
    before = getattr(torch.ops.mmfast, name)(*args)
    torch.library.opcheck(getattr(torch.ops.mmfast, name).default, args, test_utils=utils)
    if name in ("pruned_weight_cache", "cpu_output_pool"):
        assert getattr(torch.ops.mmfast, name)(*args)[-1] == before[-1]  # the budget unchanged
