"""CUDA-only tests of the masked-channel kernels (masked_conv2d, masked_linear,
masked_group_norm): run on a machine with an NVIDIA GPU (`make gpu-check`); skipped elsewhere
(the host emulator, tests/cuda_emulator/test_pruned_emulated.cpp, covers the kernels in CI).

The reference (mmfast.reference.pruned) runs on the CPU in fp64 from the same rounded inputs,
so it is independent of cuDNN / TF32 settings. Masked input channels of x hold NaN: the
kernels must never read them."""
from __future__ import annotations

import os

import pytest
import torch

from mmfast import reference
from mmfast.ops import keep_packed_weights, masked_conv2d, masked_group_norm, masked_linear, pruned_weight_cache

from _utils import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _masks(codes: int, channels: int, group: int = 0, keep: float = 0.6) -> torch.Tensor:
    """(K, C) bool: whole groups of `group` channels (group > 0; the last one may be shorter) or
    random channels; code 0 keeps nothing and code 1 everything when K >= 3."""
    if group:
        groups = torch.rand(codes, -(-channels // group)) < keep
        mask = groups.repeat_interleave(group, dim=1)[:, :channels].contiguous()
    else:
        mask = torch.rand(codes, channels) < keep
    if codes >= 3:
        mask[0] = False
        mask[1] = True
    return mask


def _nan_masked_inputs(x: torch.Tensor, sample_codes: torch.Tensor, in_mask: torch.Tensor, channel_dim: int):
    """x with NaN in each valid sample's masked channels (never read by the kernels)."""
    codes = sample_codes.long().cpu()
    valid = (codes >= 0) & (codes < in_mask.shape[0])
    keep = torch.ones(x.shape[0], x.shape[channel_dim], dtype=torch.bool)
    keep[valid] = in_mask.cpu()[codes[valid]]
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[channel_dim] = x.shape[channel_dim]
    return x.masked_fill(~keep.view(shape).to(x.device), float("nan"))


def _check_invalid_rows(out, sample_codes, codes):
    """Rows with a code outside [0, K) are NaN; returns the valid rows' indices."""
    c = sample_codes.long()
    valid = (c >= 0) & (c < codes)
    for row in torch.nonzero(~valid)[:, 0].tolist():
        assert out[row].isnan().all(), f"sample {row} (code {int(c[row])}) is not NaN"
    return torch.nonzero(valid)[:, 0]


def _check_conv(b, cin, cout, hw, k, codes, dtype, *, stride=1, padding=0, dilation=1, group=0, shared=False,
                bias=True, code_dtype=torch.int64, layout="contiguous", sample_codes=None, scale=2.0):
    h, w = hw
    kh, kw = (k, k) if isinstance(k, int) else k
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    in_mask, out_mask = _masks(codes, cin, group), _masks(codes, cout, group)
    if sample_codes is None:
        sample_codes = torch.randint(0, codes, (b,))
    sample_codes = torch.as_tensor(sample_codes).to(code_dtype)
    x = torch.randn(b, cin, h, w, dtype=torch.float64)
    weight = (torch.randn(1 if shared else codes, cout, cin, kh, kw, dtype=torch.float64) / (cin * kh * kw) ** 0.5)
    bias_t = torch.randn(1 if shared else codes, cout, dtype=torch.float64) if bias else None
    x, weight = x.to(dtype), weight.to(dtype)
    bias_t = None if bias_t is None else bias_t.to(dtype)
    x = _nan_masked_inputs(x, sample_codes, in_mask, 1)
    xd = x.cuda()
    if layout == "channels_last":
        xd = xd.to(memory_format=torch.channels_last)
    elif layout == "strided":  # a view with gaps in every dim
        big = torch.full((b, cin * 2, h + 3, w * 2), float("nan"), dtype=dtype, device="cuda")
        big[:, ::2, 1:h + 1, ::2] = xd
        xd = big[:, ::2, 1:h + 1, ::2]
        assert not xd.is_contiguous()
    out = masked_conv2d(xd, weight.cuda(), None if bias_t is None else bias_t.cuda(), sample_codes.cuda(),
                        in_mask.cuda(), out_mask.cuda(), stride=stride, padding=padding, dilation=dilation,
                        backend="native")
    assert out.is_contiguous() and out.dtype == dtype and out.device.type == "cuda"
    rows = _check_invalid_rows(out.cpu(), sample_codes, codes)
    if rows.numel():
        expected = reference.masked_conv2d_ref(x[rows].double(), weight.double(),
                                               None if bias_t is None else bias_t.double(), sample_codes[rows],
                                               in_mask, out_mask, stride, padding, dilation)
        assert out.shape[1:] == expected.shape[1:]
        assert_close(out.cpu()[rows], expected, dtype, scale=scale)
    return out


def _check_linear(b, n, cin, cout, codes, dtype, *, group=0, shared=False, bias=True, transposed=False,
                  sample_codes=None, code_dtype=torch.int64):
    in_mask, out_mask = _masks(codes, cin, group), _masks(codes, cout, group)
    if sample_codes is None:
        sample_codes = torch.randint(0, codes, (b,))
    sample_codes = torch.as_tensor(sample_codes).to(code_dtype)
    x = torch.randn(b, n, cin, dtype=torch.float64).to(dtype)
    weight = (torch.randn(1 if shared else codes, cout, cin, dtype=torch.float64) / cin ** 0.5).to(dtype)
    bias_t = torch.randn(1 if shared else codes, cout, dtype=torch.float64).to(dtype) if bias else None
    x = _nan_masked_inputs(x, sample_codes, in_mask, 2)
    xd = x.cuda()
    if transposed:  # (B, Cin, N) storage seen as (B, N, Cin)
        xd = xd.transpose(1, 2).contiguous().transpose(1, 2)
    out = masked_linear(xd, weight.cuda(), None if bias_t is None else bias_t.cuda(), sample_codes.cuda(),
                        in_mask.cuda(), out_mask.cuda(), backend="native")
    assert out.shape == (b, n, cout) and out.is_contiguous() and out.dtype == dtype
    rows = _check_invalid_rows(out.cpu(), sample_codes, codes)
    if rows.numel():
        expected = reference.masked_linear_ref(x[rows].double(), weight.double(),
                                               None if bias_t is None else bias_t.double(), sample_codes[rows],
                                               in_mask, out_mask)
        assert_close(out.cpu()[rows], expected, dtype, scale=2)
    return out


def _check_group_norm(b, c, groups, spatial, codes, dtype, *, group=0, affine="per_code", silu=False,
                      sample_codes=None, offset=0.0, code_dtype=torch.int64, weight_only=False):
    mask = _masks(codes, c, group)
    if sample_codes is None:
        sample_codes = torch.randint(0, codes, (b,))
    sample_codes = torch.as_tensor(sample_codes).to(code_dtype)
    x = (torch.randn(b, c, *spatial, dtype=torch.float64) + offset).to(dtype)
    x = _nan_masked_inputs(x, sample_codes, mask, 1)
    shape = (codes, c) if affine == "per_code" else (c,)
    weight = (1 + 0.5 * torch.randn(shape, dtype=torch.float64)).to(dtype) if affine else None
    bias = None if (not affine or weight_only) else torch.randn(shape, dtype=torch.float64).to(dtype)
    out = masked_group_norm(x.cuda(), None if weight is None else weight.cuda(), None if bias is None else bias.cuda(),
                            groups, sample_codes.cuda(), mask.cuda(), eps=1e-5, activation="silu" if silu else None,
                            backend="native")
    assert out.shape == x.shape and out.is_contiguous() and out.dtype == dtype
    rows = _check_invalid_rows(out.cpu(), sample_codes, codes)
    if rows.numel():
        expected = reference.masked_group_norm_ref(x[rows].double(), None if weight is None else weight.double(),
                                                   None if bias is None else bias.double(), groups,
                                                   sample_codes[rows], mask, 1e-5, silu)
        # fp32 statistics: a large mean costs |mean| / std ulps of the normalised value
        assert_close(out.cpu()[rows], expected, dtype, scale=2 + abs(offset))
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_smoke_every_op_dtype_and_odd_shape(dtype):
    """Every op, dtype and odd shape once against mmfast.reference.pruned: the subset
    `make gpu-check` also runs under compute-sanitizer (memcheck, racecheck)."""
    # masked_conv2d: 3x3 / 1x1 / 2x3, stride 1 and 2, padding, dilation, odd channels, keep
    # none / all, shared weights, no bias, int32 codes, strided x, invalid codes.
    _check_conv(4, 13, 30, (7, 7), 3, 3, dtype, padding=1, sample_codes=[2, 0, 1, 2])
    _check_conv(3, 13, 30, (9, 8), 3, 3, dtype, stride=2, padding=1, shared=True, code_dtype=torch.int32,
                layout="channels_last")
    _check_conv(5, 13, 30, (6, 6), 3, 3, dtype, padding=2, dilation=2, bias=False, layout="strided",
                sample_codes=[1, -1, 0, 3, 2])
    _check_conv(2, 20, 30, (7, 9), (2, 3), 3, dtype, stride=(2, 1), padding=(0, 1), dilation=(1, 2), group=10)
    _check_conv(2, 70, 70, (9, 9), 1, 2, dtype)
    # fp16 / bf16 on sm_80+: one tile, 70 steps split over blocks (masked_conv_split_reduce_kernel),
    # splits starting inside taps of a 2 x 5 kernel with dilation (2, 1).
    _check_conv(1, 200, 40, (9, 11), (2, 5), 2, dtype, padding=(1, 2), dilation=(2, 1))
    # masked_linear: odd N / channels, groups of 10, transposed x, shared weights, invalid code.
    _check_linear(3, 20, 13, 30, 3, dtype, group=10)
    _check_linear(3, 19, 13, 30, 2, dtype, shared=True, bias=False, transposed=True, sample_codes=[1, 5, 0],
                  code_dtype=torch.int32)
    # masked_group_norm: C = 30 in 3 groups of 10, (B, C) input, plane > block, silu, invalid codes.
    _check_group_norm(4, 30, 3, (7,), 3, dtype, group=10, silu=True, sample_codes=[2, 0, 1, 1])
    _check_group_norm(4, 30, 3, (5, 3), 3, dtype, affine="shared", sample_codes=[1, 3, 0, -2],
                      code_dtype=torch.int32)
    _check_group_norm(3, 13, 1, (), 2, dtype, affine=None, silu=True)
    _check_group_norm(2, 8, 2, (17, 19), 2, dtype, weight_only=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("level", ["12x12 C=320", "24x24 C=160"])
def test_cuda_conv_aptp_shapes(dtype, level):
    """SD-style ResNet convs at low resolution, K = 8 codes pruned in 32 groups, several
    channel and pixel tiles per sample, one code per sample."""
    hw, c = ((12, 12), 320) if level.startswith("12") else ((24, 24), 160)
    _check_conv(6, c, c, hw, 3, 8, dtype, padding=1, group=c // 32, scale=4)
    _check_conv(4, c, c, hw, 1, 8, dtype, group=c // 32, shared=True, scale=4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_conv_masks_keep_everything_equals_dense_conv(dtype):
    """Every channel kept with one shared weight: the dense F.conv2d."""
    x = torch.randn(3, 24, 10, 11, dtype=dtype, device="cuda")
    weight = torch.randn(1, 40, 24, 3, 3, dtype=dtype, device="cuda") / 15
    bias = torch.randn(1, 40, dtype=dtype, device="cuda")
    ones_in, ones_out = torch.ones(2, 24, dtype=torch.bool), torch.ones(2, 40, dtype=torch.bool)
    codes = torch.tensor([0, 1, 1])
    out = masked_conv2d(x, weight, bias, codes.cuda(), ones_in.cuda(), ones_out.cuda(), stride=(1, 2), padding=1,
                        backend="native")
    expected = torch.nn.functional.conv2d(x.cpu().double(), weight[0].cpu().double(), bias[0].cpu().double(),
                                          stride=(1, 2), padding=1)
    assert_close(out.cpu(), expected, dtype, scale=2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_group_norm_large_groups_and_offsets(dtype):
    """Groups larger than a block many times over, and a mean far from 0 (two-pass variance)."""
    _check_group_norm(2, 320, 32, (24, 24), 4, dtype, group=10, silu=True)
    _check_group_norm(2, 64, 4, (33,), 3, dtype, offset=30.0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_cuda_group_norm_of_a_group_past_2_to_the_31_elements(backend):
    """One group of 2^31 elements (num_groups = 1 over 512 channels of 2048 x 2048, 4 GiB of
    fp16): the Triton kernel once counted a group's elements in int32, which wrapped to a
    negative count and left the output unwritten. Against F.group_norm, a channel block at a time."""
    if backend == "triton":
        pytest.importorskip("triton")
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU of 24 GiB or more (about 12 GiB at its peak)")
    x = torch.randn(1, 512, 2048, 2048, dtype=torch.float16, device="cuda")
    codes, mask = torch.zeros(1, dtype=torch.long, device="cuda"), torch.ones(1, 512, dtype=torch.bool, device="cuda")
    y = masked_group_norm(x, None, None, 1, codes, mask, backend=backend)
    expected = torch.nn.functional.group_norm(x, 1)
    del x
    for c0 in range(0, 512, 32):
        assert_close(y[:, c0:c0 + 32], expected[:, c0:c0 + 32], torch.float16)


@pytest.mark.cuda
def test_cuda_ops_agree_with_the_cpu_kernels():
    """The CUDA and CPU registrations on the same valid inputs (fp32)."""
    codes = torch.tensor([2, 0, 1, 2, 1])
    in_mask, out_mask = _masks(3, 16, 4), _masks(3, 24, 4)
    x = torch.randn(5, 16, 11, 9)
    weight, bias = torch.randn(3, 24, 16, 3, 3) / 12, torch.randn(3, 24)
    args = (codes, in_mask, out_mask)
    cpu = masked_conv2d(x, weight, bias, *args, stride=2, padding=1, backend="native")
    gpu = masked_conv2d(x.cuda(), weight.cuda(), bias.cuda(), *(t.cuda() for t in args), stride=2, padding=1,
                        backend="native")
    assert_close(gpu.cpu(), cpu, torch.float32, scale=4)
    xl = torch.randn(5, 7, 16)
    cpu = masked_linear(xl, weight[:, :, :, 0, 0].contiguous(), bias, *args, backend="native")
    gpu = masked_linear(xl.cuda(), weight[:, :, :, 0, 0].contiguous().cuda(), bias.cuda(), *(t.cuda() for t in args),
                        backend="native")
    assert_close(gpu.cpu(), cpu, torch.float32, scale=4)
    gn_mask = _masks(3, 24, 6)
    h = torch.randn(5, 24, 6, 6)
    cpu = masked_group_norm(h, None, bias, 4, codes, gn_mask, activation="silu", backend="native")
    gpu = masked_group_norm(h.cuda(), None, bias.cuda(), 4, codes.cuda(), gn_mask.cuda(), activation="silu",
                            backend="native")
    assert_close(gpu.cpu(), cpu, torch.float32, scale=4)


@pytest.mark.cuda
def test_cuda_empty_inputs():
    """B = 0 returns empty outputs without a launch error (Cin = 0 and Cout = 0 on CUDA:
    tests/test_pruned.py::test_zero_sized_channels_and_batch)."""
    mask_in, mask_out = torch.ones(2, 5, dtype=torch.bool, device="cuda"), torch.ones(2, 4, dtype=torch.bool,
                                                                                        device="cuda")
    x = torch.randn(0, 5, 6, 6, device="cuda")
    out = masked_conv2d(x, torch.randn(2, 4, 5, 3, 3, device="cuda"), None,
                        torch.zeros(0, dtype=torch.long, device="cuda"), mask_in, mask_out, padding=1,
                        backend="native")
    assert out.shape == (0, 4, 6, 6)
    out = masked_group_norm(torch.randn(0, 4, 3, device="cuda"), None, None, 2,
                            torch.zeros(0, dtype=torch.long, device="cuda"), mask_out, backend="native")
    assert out.shape == (0, 4, 3)


@pytest.mark.cuda
def test_cuda_graph_replays_masked_conv2d():
    """masked_conv2d (+ group norm + SiLU + a second conv: the inside of an APTP ResNet block)
    captured once in a CUDA graph and replayed on new inputs and new codes: each replay equals
    the eager ops (no host synchronisation inside, the routing plan is rebuilt on the device)."""
    b, c, hw, codes_n = 6, 40, 12, 4
    in_mask, mid_mask = _masks(codes_n, c, 10).cuda(), _masks(codes_n, c, 10).cuda()
    w1 = torch.randn(codes_n, c, c, 3, 3, device="cuda") / 20
    w2 = torch.randn(codes_n, c, c, 3, 3, device="cuda") / 20
    b1, b2 = torch.randn(codes_n, c, device="cuda"), torch.randn(codes_n, c, device="cuda")
    gn_w, gn_b = torch.randn(codes_n, c, device="cuda"), torch.randn(codes_n, c, device="cuda")
    all_in = torch.ones(codes_n, c, dtype=torch.bool, device="cuda")
    x = torch.randn(b, c, hw, hw, device="cuda")
    sample_codes = torch.randint(0, codes_n, (b,), device="cuda")

    def block():
        h = masked_conv2d(x, w1, b1, sample_codes, in_mask, mid_mask, padding=1, backend="native")
        h = masked_group_norm(h, gn_w, gn_b, 4, sample_codes, mid_mask, activation="silu", backend="native")
        return masked_conv2d(h, w2, b2, sample_codes, mid_mask, all_in, padding=1, backend="native")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        block()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = block()
    for step in range(3):
        x.copy_(torch.randn_like(x))
        sample_codes.copy_(torch.randint(0, codes_n, (b,), device="cuda"))
        if step == 2:
            sample_codes[1] = codes_n  # an invalid code: NaN rows, still no sync
        graph.replay()
        torch.cuda.synchronize()
        expected = block()
        torch.testing.assert_close(static_out, expected, atol=0, rtol=0, equal_nan=True)
    assert static_out[1].isnan().all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_conv_masked_outputs_stay_zero_with_infinite_inputs(dtype):
    """An infinite kept input (an fp16 activation that overflowed) must not leak into masked
    outputs: the packed path multiplies masked rows of a 128-channel tile by zero-filled weights
    (0 * Inf = NaN), so it writes them as exact zeros instead."""
    torch.manual_seed(0)
    x = torch.randn(2, 70, 9, 9, dtype=dtype, device="cuda")
    in_mask, out_mask = torch.ones(2, 70, dtype=torch.bool), torch.rand(2, 70) < 0.5
    x[:, :, 4, 4] = float("inf")
    weight = (torch.randn(2, 70, 70, 3, 3) / 25).to(dtype).cuda()
    out = masked_conv2d(x, weight, None, torch.tensor([1, 0], device="cuda"), in_mask.cuda(), out_mask.cuda(),
                        padding=1, backend="native")
    masked = ~out_mask[[1, 0]].cuda()  # (B, Cout): each sample's masked outputs
    assert masked.any() and (out[masked] == 0).all() and not out[~masked].isfinite().all()


@pytest.mark.cuda
@pytest.mark.parametrize("linear", [False, True], ids=["conv2d", "linear"])
def test_cuda_kept_packed_weights_are_reused_and_never_stale(linear):
    """keep_packed_weights on CUDA (bf16: the packed path on sm_80+): every code's weights packed
    once per (weight, masks) and reused with bit-identical results; an in-place update of the
    weight or another mask is repacked (the result equals the per-call packing's)."""
    torch.manual_seed(0)
    cin, cout, codes = 40, 48, 3
    x = torch.randn(4, cin, 9, 9, dtype=torch.bfloat16, device="cuda")
    weight = (torch.randn(codes, cout, cin, 3, 3) / 20).to(torch.bfloat16).cuda()
    bias = torch.randn(codes, cout, dtype=torch.bfloat16, device="cuda")
    sample_codes = torch.tensor([2, 0, 1, 2], device="cuda")
    in_mask, out_mask = _masks(codes, cin, group=4).cuda(), _masks(codes, cout, group=4).cuda()
    if linear:
        x, weight = x.flatten(2).transpose(1, 2).contiguous(), weight[..., 1, 1].contiguous()

    def call(mask=in_mask):
        if linear:
            return masked_linear(x, weight, bias, sample_codes, mask, out_mask, backend="native")
        return masked_conv2d(x, weight, bias, sample_codes, mask, out_mask, padding=1, backend="native")

    per_call = call()
    pruned_weight_cache(clear=True)
    with keep_packed_weights(budget_mb=64):
        assert torch.equal(call(), per_call)
        state = pruned_weight_cache()
        assert state["entries"] == 1 and state["bytes"] > 0  # one entry: every code's weights
        assert torch.equal(call(), per_call)
        assert pruned_weight_cache() == state  # reused, nothing added
        with torch.no_grad():
            weight[1].mul_(-2.0)  # in place, through a view: a new version of the same storage
        updated = call()
        other_mask = in_mask.clone()
        other_mask[:, :8] = ~other_mask[:, :8]
        remasked = call(other_mask)
        assert pruned_weight_cache()["entries"] == 1  # stale entries replaced, not added
    assert pruned_weight_cache()["entries"] == 0
    assert not torch.equal(updated, per_call)
    assert torch.equal(updated, call()) and torch.equal(remasked, call(other_mask))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_packed_conv_runs_on_wgmma_on_sm90a(dtype):
    """On sm_90 with an sm_90a build the packed conv multiplies by wgmma
    (masked_conv_async_kernel<T, NtWgmma>): several channel and pixel tiles, a tile whose kept
    rows end in its first warpgroup (that warpgroup alone multiplies), a split reduction (one
    sample at 12x12) and a 1x1 conv, against the fp64 reference."""
    from torch.profiler import ProfilerActivity, profile

    from mmfast import _extension

    if torch.cuda.get_device_capability() != (9, 0) or not getattr(_extension.build_info, "cuda_wgmma", False):
        pytest.skip("wgmma needs an sm_90 GPU and a build with sm_90a code (TORCH_CUDA_ARCH_LIST with 9.0a)")
    if os.environ.get("MMFAST_CUDA_WGMMA", "")[:1] == "0":
        pytest.skip("MMFAST_CUDA_WGMMA=0 keeps mma.sync")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _check_conv(3, 72, 300, (11, 13), 3, 2, dtype, padding=1, scale=4)
        _check_conv(4, 200, 70, (9, 9), 3, 3, dtype, padding=1, sample_codes=[1, 1, 2, 1], scale=4)
        _check_conv(1, 320, 320, (12, 12), 3, 8, dtype, padding=1, group=10, scale=4)
        _check_conv(2, 160, 96, (24, 24), 1, 3, dtype, scale=4)
        torch.cuda.synchronize()
    kernels = {event.key for event in prof.key_averages()}
    assert any("masked_conv_async_kernel" in name and "NtWgmma" in name for name in kernels), kernels
