"""The Triton twins of the masked-channel ops (torch.ops.mmfast_triton.masked_conv2d, masked_linear,
masked_group_norm) against mmfast.reference.pruned: every dtype the interpreter runs, stride /
padding / dilation, 1x1 and 3x3 (and rectangular) kernels, odd channel counts, masks keeping
nothing or everything, per-code vs shared weights, bias None, strided x, several tiles, masked
inputs / weights holding NaN (never read), invalid codes (NaN), gradients, opcheck and
torch.compile. Without a GPU they run under TRITON_INTERPRET=1 (conftest.py): shapes are tiny."""
from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast import reference

from _utils import HAS_TRITON, TRITON_DEVICE, assert_close

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

DEVICE = TRITON_DEVICE
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def ns():
    import mmfast.triton  # noqa: F401
    return torch.ops.mmfast_triton


@pytest.fixture
def blocks(monkeypatch):
    """Sets the conv kernel's (BLOCK_P, BLOCK_O, BLOCK_I) and the group norm's chunk."""
    from mmfast.triton import pruned as triton_pruned

    def set_blocks(conv=None, group_norm=None):
        monkeypatch.setattr(triton_pruned, "FORCE_BLOCKS", conv)
        monkeypatch.setattr(triton_pruned, "FORCE_GN_BLOCK", group_norm)
    return set_blocks


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(DEVICE, dtype)


def cpu_fp64(fn, *args):
    """fn (a reference, or F.conv2d) on the CPU in fp64, the result back on DEVICE: on a GPU an fp32
    conv would run on cuDNN's TF32 (torch.backends.cudnn.allow_tf32 is on by default), too coarse
    an oracle for fp32 kernels."""
    def cpu(a):
        if not torch.is_tensor(a):
            return a
        return a.detach().cpu().double() if a.is_floating_point() else a.cpu()
    return fn(*map(cpu, args)).to(DEVICE)


def codes_tensor(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def channel_masks(codes: int, channels: int, generator_seed: int = 0) -> torch.Tensor:
    """(K, C) bool: code 0 random, code 1 everything, code 2 nothing, further codes random."""
    g = torch.Generator().manual_seed(generator_seed)
    mask = torch.rand(codes, channels, generator=g) < 0.5
    mask[0, 0] = True
    mask[1] = True
    if codes > 2:
        mask[2] = False
    return mask.to(DEVICE)


def poison_masked(x, weight, bias, sample_codes, in_mask, out_mask):
    """NaN into every input channel a sample's code masks, and (per-code weights) into the
    masked rows / columns of each code's weights and bias: none of it may be read."""
    x = x.clone()
    for b, c in enumerate(sample_codes.tolist()):
        x[b, ~in_mask[c]] = float("nan")
    if weight.shape[0] > 1:
        weight = weight.clone()
        for c in range(weight.shape[0]):
            weight[c, ~out_mask[c]] = float("nan")
            weight[c][:, ~in_mask[c]] = float("nan")
    if bias is not None and bias.shape[0] > 1:
        bias = bias.clone()
        for c in range(bias.shape[0]):
            bias[c, ~out_mask[c]] = float("nan")
    return x, weight, bias


# --- masked_conv2d ----------------------------------------------------------------------------

# (Cin, Cout, H, W, kh, kw, stride, padding, dilation, per-code weights, bias: None / "shared" /
# "per-code", x layout: "contiguous" / "channels-last" / "sliced")
CONV_CASES = {
    "3x3-s1-p1": (13, 11, 6, 5, 3, 3, (1, 1), (1, 1), (1, 1), True, "per-code", "contiguous"),
    "3x3-s2-dil2": (7, 9, 8, 7, 3, 3, (2, 1), (1, 2), (1, 2), False, None, "channels-last"),
    "1x1-s2": (10, 6, 5, 6, 1, 1, (2, 2), (0, 0), (1, 1), True, "shared", "sliced"),
    "3x2-valid": (5, 17, 6, 7, 3, 2, (1, 2), (0, 0), (2, 1), True, None, "contiguous"),
}


def make_x(shape, dtype, layout):
    b, c, h, w = shape
    if layout == "channels-last":
        return randn(b, h, w, c, dtype=dtype).permute(0, 3, 1, 2)
    if layout == "sliced":
        return randn(b, 2 * c, h, w + 1, dtype=dtype)[:, ::2, :, 1:]
    return randn(b, c, h, w, dtype=dtype)


def make_conv(case, dtype, sample_codes):
    cin, cout, h, w, kh, kw, stride, padding, dilation, per_code, bias_kind, layout = CONV_CASES[case]
    codes = 4
    x = make_x((len(sample_codes), cin, h, w), dtype, layout)
    weight = randn(codes if per_code else 1, cout, cin, kh, kw, dtype=dtype)
    bias = None if bias_kind is None else randn(codes if bias_kind == "per-code" else 1, cout, dtype=dtype)
    in_mask, out_mask = channel_masks(codes, cin, 1), channel_masks(codes, cout, 2)
    out_mask[3] = True  # code 3: random inputs, every output (code 2 keeps nothing)
    return x, weight, bias, in_mask, out_mask, (list(stride), list(padding), list(dilation))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_matches_reference(ns, case, dtype):
    sample_codes = codes_tensor([0, 3, 1, 2, 0])
    x, weight, bias, in_mask, out_mask, conv = make_conv(case, dtype, sample_codes)
    want = cpu_fp64(reference.masked_conv2d_ref, x, weight, bias, sample_codes, in_mask, out_mask, *conv)
    x, weight, bias = poison_masked(x, weight, bias, sample_codes, in_mask, out_mask)
    got = ns.masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, *conv)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    assert_close(got, want, dtype)
    for b, c in enumerate(sample_codes.tolist()):  # masked outputs exactly 0
        assert bool((got[b, ~out_mask[c]] == 0).all())


def test_conv2d_several_tiles_of_pixels_and_channels(ns, blocks):
    # 16-wide tiles: 3 input chunks, 3 output-channel tiles (kept ones, then masked-only ones),
    # several pixel tiles per sample; int32 codes.
    blocks(conv=(16, 16, 16))
    sample_codes = codes_tensor([1, 0, 2, 0], torch.int32)
    x = randn(4, 37, 7, 6)
    weight, bias = randn(3, 35, 37, 3, 3), randn(3, 35)
    in_mask, out_mask = channel_masks(3, 37, 3), channel_masks(3, 35, 4)
    conv = ([1, 1], [1, 1], [1, 1])
    want = cpu_fp64(reference.masked_conv2d_ref, x, weight, bias, sample_codes, in_mask, out_mask, *conv)
    got = ns.masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, *conv)
    assert_close(got, want, torch.float32)


def test_conv2d_dense_masks_equal_torch_conv(ns):
    x, weight, bias = randn(2, 6, 5, 5), randn(1, 8, 6, 3, 3), randn(1, 8)
    ones_in, ones_out = torch.ones(1, 6, dtype=torch.bool), torch.ones(1, 8, dtype=torch.bool)
    got = ns.masked_conv2d(x, weight, bias, codes_tensor([0, 0]), ones_in, ones_out, [2, 1], [1, 0], [1, 1])
    want = cpu_fp64(torch.nn.functional.conv2d, x, weight[0], bias[0], (2, 1), (1, 0))
    assert_close(got, want, torch.float32)


# --- masked_linear ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_code", [True, False], ids=["per-code", "shared"])
def test_linear_matches_reference(ns, dtype, per_code):
    sample_codes = codes_tensor([2, 0, 1, 0])
    codes, cin, cout, tokens = 3, 13, 19, 5
    x = randn(4, cin, tokens, dtype=dtype).transpose(1, 2)  # (B, N, Cin) with a strided Cin
    weight = randn(codes if per_code else 1, cout, cin, dtype=dtype)
    bias = randn(codes, cout, dtype=dtype) if per_code else None
    in_mask, out_mask = channel_masks(codes, cin, 5), channel_masks(codes, cout, 6)
    want = reference.masked_linear_ref(x, weight, bias, sample_codes, in_mask, out_mask)
    x, weight, bias = poison_masked(x.transpose(1, 2), weight, bias, sample_codes, in_mask, out_mask)
    got = ns.masked_linear(x.transpose(1, 2), weight, bias, sample_codes, in_mask, out_mask)
    assert got.shape == (4, tokens, cout) and got.dtype == dtype and got.is_contiguous()
    assert_close(got, want, dtype)


# --- masked_group_norm ------------------------------------------------------------------------


def group_masks(codes: int, channels: int, groups: int) -> torch.Tensor:
    """Code 0 whole groups (as APTP prunes), 1 everything, 2 nothing, 3 channels at random."""
    size = channels // groups
    mask = torch.zeros(codes, channels, dtype=torch.bool)
    mask[0, :size] = True
    mask[0, 2 * size:3 * size] = True
    mask[1] = True
    mask[3] = torch.rand(channels, generator=torch.Generator().manual_seed(7)) < 0.5
    return mask.to(DEVICE)


# (x shape, groups, affine: None / "shared" / "per-code")
GN_CASES = {
    "c30-g3-per-code": ((5, 30, 3, 4), 3, "per-code"),
    "c30-g3-shared-3d": ((5, 30, 7), 3, "shared"),
    "c12-g4-none-2d": ((5, 12), 4, None),
}


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GN_CASES))
def test_group_norm_matches_reference(ns, case, dtype, silu):
    shape, groups, affine = GN_CASES[case]
    channels = shape[1]
    sample_codes = codes_tensor([0, 3, 1, 2, 3])
    mask = group_masks(4, channels, groups)
    x = randn(*shape, dtype=dtype) * 3 + 1
    weight = bias = None
    if affine is not None:
        rows = (4,) if affine == "per-code" else ()
        weight, bias = randn(*rows, channels, dtype=dtype), randn(*rows, channels, dtype=dtype)
    want = reference.masked_group_norm_ref(x, weight, bias, groups, sample_codes, mask, 1e-5, silu)
    poisoned = x.clone()
    for b, c in enumerate(sample_codes.tolist()):
        poisoned[b, ~mask[c]] = float("nan")
    got = ns.masked_group_norm(poisoned, weight, bias, groups, sample_codes, mask, 1e-5, silu)
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    assert_close(got, want, dtype)
    for b, c in enumerate(sample_codes.tolist()):
        assert bool((got[b, ~mask[c]] == 0).all())


def test_group_norm_strided_x_several_chunks_and_torch_equivalence(ns, blocks):
    blocks(group_norm=16)  # groups of 10 channels x 6 pixels: 4 chunks per pass
    x = randn(3, 6, 2, 30).permute(0, 3, 1, 2)  # (B, C, H, W) channels-last
    weight, bias = randn(30), randn(30)
    mask = torch.ones(2, 30, dtype=torch.bool, device=DEVICE)
    mask[1, 10:20] = False
    sample_codes = codes_tensor([0, 1, 0], torch.int32)
    got = ns.masked_group_norm(x, weight, bias, 3, sample_codes, mask, 1e-6, True)
    want = reference.masked_group_norm_ref(x, weight, bias, 3, sample_codes, mask, 1e-6, True)
    assert_close(got, want, torch.float32)
    dense = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 3, weight, bias, 1e-6))
    assert_close(got[[0, 2]], dense[[0, 2]], torch.float32)  # code 0 keeps every channel


def test_group_norm_far_off_mean_several_chunks(ns, blocks):
    """A mean 1000 standard deviations out, over 2 chunks of 16 lanes: the one-read statistics
    (per-lane Welford, lanes merged pairwise) keep the variance where E[x^2] - mean^2 in fp32
    would lose it entirely."""
    blocks(group_norm=16)
    x = randn(2, 20, 3) + 1000.0  # groups of 10 channels x 3 pixels: 30 elements, 2 chunks
    mask = torch.ones(1, 20, dtype=torch.bool, device=DEVICE)
    mask[0, 12:15] = False
    sample_codes = codes_tensor([0, 0])
    got = ns.masked_group_norm(x, None, None, 2, sample_codes, mask, 1e-5, False)
    want = reference.masked_group_norm_ref(x.double(), None, None, 2, sample_codes, mask, 1e-5, False)
    # x - mean near 1000 rounds to ulp(1000) = 6e-5 per element: a few of those relative to std 1
    assert_close(got, want.float(), torch.float32, scale=10.0)


# --- invalid codes, dtypes, public API ------------------------------------------------------------


def test_invalid_codes_write_nan_over_the_sample(ns):
    # Like the CUDA kernels (no host synchronisation), on the GPU and under the interpreter.
    sample_codes = codes_tensor([0, 2, -1, 1])
    in_mask, out_mask = channel_masks(2, 5, 1), channel_masks(2, 4, 2)
    x, weight = randn(4, 5, 4, 4), randn(2, 4, 5, 3, 3)
    got = ns.masked_conv2d(x, weight, None, sample_codes, in_mask, out_mask, [1, 1], [1, 1], [1, 1])
    ok = codes_tensor([0, 3])
    want = cpu_fp64(reference.masked_conv2d_ref, x[[0, 3]], weight, None, sample_codes[ok], in_mask, out_mask,
                    [1, 1], [1, 1], [1, 1])
    assert_close(got[[0, 3]], want, torch.float32)
    assert bool(got[[1, 2]].isnan().all())

    xl, wl = randn(4, 3, 5), randn(2, 4, 5)
    got = ns.masked_linear(xl, wl, None, sample_codes, in_mask, out_mask)
    assert bool(got[[1, 2]].isnan().all()) and not bool(got[[0, 3]].isnan().any())

    mask = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    got = ns.masked_group_norm(randn(4, 6, 3), None, None, 2, sample_codes, mask, 1e-5, False)
    assert bool(got[[1, 2]].isnan().all()) and not bool(got[[0, 3]].isnan().any())


def test_float64_and_bad_inputs_raise(ns):
    x, weight = randn(2, 3, 4, 4, dtype=torch.float64), randn(1, 2, 3, 1, 1, dtype=torch.float64)
    masks = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(TypeError, match="no float64 kernels"):
        ns.masked_conv2d(x, weight, None, codes_tensor([0, 0]), *masks, [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="in_mask must be"):  # the shared checks run first
        ns.masked_conv2d(x.float(), weight.float(), None, codes_tensor([0, 0]), masks[1], masks[1], [1, 1], [0, 0],
                         [1, 1])
    with pytest.raises(ValueError, match="num_groups must divide"):
        ns.masked_group_norm(randn(2, 6, 3), None, None, 4, codes_tensor([0, 0]), torch.ones(1, 6, dtype=torch.bool),
                             1e-5, False)


def test_public_api_routes_to_triton():
    sample_codes = codes_tensor([1, 0])
    x, weight = randn(2, 4, 5, 5), randn(2, 3, 4, 3, 3)
    in_mask, out_mask = channel_masks(2, 4, 8), channel_masks(2, 3, 9)
    got = mmfast.ops.masked_conv2d(x, weight, None, sample_codes, in_mask, out_mask, stride=2, padding=1,
                                   backend="triton")
    want = cpu_fp64(reference.masked_conv2d_ref, x, weight, None, sample_codes, in_mask, out_mask, (2, 2), (1, 1),
                    (1, 1))
    assert_close(got, want, torch.float32)


# --- gradients, opcheck, torch.compile ------------------------------------------------------------


def test_gradients_match_the_reference_autograd(ns):
    # No float64 kernels, so no gradcheck: fp32 gradients through the Triton ops (the shared
    # autograd of ops/pruned.py) against the fp64 reference's autograd.
    sample_codes = codes_tensor([1, 0, 2])
    in_mask, out_mask = channel_masks(3, 5, 10), channel_masks(3, 6, 11)
    x, weight, bias = randn(3, 5, 5, 4), randn(3, 6, 5, 3, 3), randn(1, 6)
    xl, wl = randn(3, 4, 5), randn(1, 6, 5)
    xg, gw, gb = randn(3, 6, 2, 3), randn(3, 6), randn(3, 6)
    gn_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 1, 1, 0, 1]], dtype=torch.bool, device=DEVICE)
    conv = ([2, 1], [1, 1], [1, 2])

    def run(module, tensors, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
        cx, cw, cb, lx, lw, gx, gwt, gbt = leaves
        if module is ns:
            y1 = ns.masked_conv2d(cx, cw, cb, sample_codes, in_mask, out_mask, *conv)
            y2 = ns.masked_linear(lx, lw, None, sample_codes, in_mask, out_mask)
            y3 = ns.masked_group_norm(gx, gwt, gbt, 2, sample_codes, gn_mask, 1e-5, True)
        else:
            y1 = reference.masked_conv2d_ref(cx, cw, cb, sample_codes, in_mask, out_mask, *conv)
            y2 = reference.masked_linear_ref(lx, lw, None, sample_codes, in_mask, out_mask)
            y3 = reference.masked_group_norm_ref(gx, gwt, gbt, 2, sample_codes, gn_mask, 1e-5, True)
        g = torch.Generator().manual_seed(3)
        loss = sum((y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum() for y in (y1, y2, y3))
        return torch.autograd.grad(loss, leaves)

    tensors = (x, weight, bias, xl, wl, xg, gw, gb)
    for got, want in zip(run(ns, tensors, torch.float32), run(reference, tensors, torch.float64)):
        assert_close(got, want, torch.float32)  # measured under the interpreter: <= 0.013 of it


def test_opcheck(ns):
    sample_codes = codes_tensor([1, 0])
    in_mask, out_mask = channel_masks(2, 4, 12), channel_masks(2, 3, 13)
    x, weight, bias = randn(2, 4, 4, 3), randn(2, 3, 4, 3, 3), randn(2, 3)
    torch.library.opcheck(ns.masked_conv2d.default,
                          (x.requires_grad_(), weight, bias, sample_codes, in_mask, out_mask, [1, 1], [1, 1], [1, 1]))
    torch.library.opcheck(ns.masked_linear.default,
                          (randn(2, 3, 4).requires_grad_(), randn(1, 3, 4), None, sample_codes, in_mask, out_mask))
    mask = channel_masks(2, 6, 14)
    torch.library.opcheck(ns.masked_group_norm.default,
                          (randn(2, 6, 3).requires_grad_(), randn(2, 6), randn(2, 6), 2, sample_codes, mask, 1e-5,
                           True))


def test_group_norm_of_an_empty_permuted_input_is_contiguous(ns):
    """An empty x with permuted strides: the output is contiguous, as the fake and the native op
    give it (empty_like kept the odd strides, since contiguous() leaves an empty tensor alone)."""
    x = randn(4, 2, 0, 6).permute(0, 3, 2, 1)  # (4, 6, 0, 2)
    args = (x, None, None, 3, codes_tensor([0, 1, 2, 0]), channel_masks(3, 6, 1), 1e-5, False)
    y = ns.masked_group_norm(*args)
    assert y.shape == (4, 6, 0, 2) and y.is_contiguous()
    assert y.stride() == torch.ops.mmfast.masked_group_norm(*args).stride()


def test_torch_compile_fullgraph_block():
    torch._dynamo.reset()
    sample_codes = codes_tensor([1, 0, 1])
    in_mask, out_mask = channel_masks(2, 4, 15), channel_masks(2, 6, 16)
    out_mask[:, :3] = out_mask[:, 3:] = out_mask[:, :1]  # whole groups of 3 channels
    x, weight, bias = randn(3, 4, 5, 5), randn(2, 6, 4, 3, 3), randn(2, 6)

    linear_weight, linear_mask = randn(2, 5, 6), channel_masks(2, 5, 17)

    def block(x):
        y = mmfast.ops.masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, padding=1, backend="triton")
        y = mmfast.ops.masked_group_norm(y, None, None, 2, sample_codes, out_mask, activation="silu",
                                         backend="triton")
        tokens = y.flatten(2).transpose(1, 2)  # (B, N, C) as a transformer block's
        return mmfast.ops.masked_linear(tokens, linear_weight, None, sample_codes, out_mask, linear_mask,
                                        backend="triton")

    want = block(x)
    got = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want)
