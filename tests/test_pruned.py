"""The masked-channel ops (APTP's mixed-code batches) on the native backend: each sample against
its own physically sliced expert run by torch (F.conv2d / F.linear / F.group_norm on the kept
channels and weights), the fp64 reference at per-dtype tolerances, gradients, opcheck,
torch.compile and every bad input. The Triton twins: tests/test_pruned_triton.py."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfast import reference
from mmfast.ops import keep_packed_weights, masked_conv2d, masked_group_norm, masked_linear, pruned_weight_cache

from _utils import assert_close, backend_params, make_routing

NATIVE = [pytest.param("cpu", id="native-cpu"), pytest.param("cuda", id="native-cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def sliced_conv(x, weight, bias, sample_codes, in_mask, out_mask, **conv):
    """Per sample: the physically sliced expert's F.conv2d, embedded back (fp64)."""
    outs = []
    for b, code in enumerate(sample_codes.tolist()):
        w = weight[code if weight.shape[0] > 1 else 0].double()
        kin, kout = in_mask[code].nonzero()[:, 0], out_mask[code].nonzero()[:, 0]
        bias_c = None if bias is None else bias[code if bias.shape[0] > 1 else 0][kout].double()
        y = F.conv2d(x[b:b + 1].double(), w, None, **conv)  # only for the output shape
        y = torch.zeros_like(y)
        if kout.numel():
            if kin.numel():
                y[:, kout] = F.conv2d(x[b:b + 1, kin].double(), w[kout][:, kin], bias_c, **conv)
            elif bias_c is not None:
                y[:, kout] = bias_c[:, None, None]
        outs.append(y)
    return torch.cat(outs)


CONV_CASES = {
    "3x3 pad 1": dict(kernel=3, stride=1, padding=1, dilation=1, size=(9, 7)),
    "3x3 stride 2": dict(kernel=3, stride=2, padding=1, dilation=1, size=(9, 8)),
    "1x1": dict(kernel=1, stride=1, padding=0, dilation=1, size=(5, 6)),
    "3x3 dilation 2 no pad": dict(kernel=3, stride=1, padding=0, dilation=2, size=(8, 9)),
}


@pytest.mark.parametrize("device", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_equals_each_sliced_expert(device, dtype, case):
    c = CONV_CASES[case]
    batch, codes, cin, cout = 7, 3, 13, 30  # odd channel counts, group size 10
    x = torch.randn(batch, cin, *c["size"], device=device).to(dtype)
    weight = torch.randn(codes, cout, cin, c["kernel"], c["kernel"], device=device).to(dtype)
    bias = torch.randn(codes, cout, device=device).to(dtype)
    sample_codes, in_mask, out_mask = make_routing(batch, codes, cin, cout, device, groups=3)
    conv = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"])
    y = masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, **conv)
    assert y.dtype == dtype and y.is_contiguous()
    expected = sliced_conv(x, weight, bias, sample_codes, in_mask, out_mask, **conv)
    assert_close(y, expected, dtype)  # fp32 sums of the same rounded inputs, rounded once
    masked_out = ~out_mask[sample_codes.long()]
    assert (y[masked_out] == 0).all()


def _cached_layer(linear=False):
    torch.manual_seed(3)
    batch, codes, cin, cout = 6, 3, 12, 20
    x = torch.randn(batch, 5, cin) if linear else torch.randn(batch, cin, 6, 5)
    weight = torch.randn(codes, cout, cin) if linear else torch.randn(codes, cout, cin, 3, 3)
    bias = torch.randn(codes, cout)
    return x, weight, bias, *make_routing(batch, codes, cin, cout, "cpu", groups=4)


def _expected(linear, x, weight, bias, sample_codes, in_mask, out_mask):
    if linear:
        return sliced_linear(x, weight, bias, sample_codes, in_mask, out_mask)
    return sliced_conv(x, weight, bias, sample_codes, in_mask, out_mask, padding=1)


def _call(linear, *args):
    return masked_linear(*args) if linear else masked_conv2d(*args, padding=1)


def _kept():
    state = pruned_weight_cache()
    return state["entries"], state["bytes"]


@pytest.mark.parametrize("linear", [False, True], ids=["conv2d", "linear"])
def test_kept_packed_weights_are_reused_and_never_stale(linear):
    """keep_packed_weights: each code's packed weight reused while the weight is unchanged,
    replaced after an in-place update or a mask change; off by default and after the block."""
    pruned_weight_cache(clear=True)
    assert pruned_weight_cache()["budget_mb"] == 0  # off unless asked for
    x, weight, bias, sample_codes, in_mask, out_mask = _cached_layer(linear)
    args = [x, weight, bias, sample_codes, in_mask, out_mask]
    first = _call(linear, *args)
    assert _kept() == (0, 0)
    with keep_packed_weights(budget_mb=64):
        assert pruned_weight_cache()["budget_mb"] == 64
        assert torch.equal(_call(linear, *args), first)
        entries, nbytes = _kept()
        assert entries == 3 and nbytes > 0  # every code prunes something here
        assert torch.equal(_call(linear, *args), first)
        assert _kept() == (entries, nbytes)  # reused, nothing added

        with torch.no_grad():
            weight[1].mul_(-2.0)  # in place, through a view: a new version of the same storage
        assert_close(_call(linear, *args), _expected(linear, *args), torch.float32)
        args[4] = in_mask.clone()
        args[4][:, :4] = ~args[4][:, :4]  # another mask with the same weight
        assert_close(_call(linear, *args), _expected(linear, *args), torch.float32)
        assert _kept()[0] == 3  # stale entries replaced, not added

        fresh = weight.clone()  # the same values in another storage: entries of its own
        assert_close(_call(linear, x, fresh, *args[2:]), _expected(linear, *args), torch.float32)
        assert _kept()[0] == 6
        del fresh
        _call(linear, x, weight.clone(), *args[2:])  # an insertion drops the freed weight's entries
        assert _kept()[0] == 6

        pruned_weight_cache(clear=True)
        with torch.inference_mode():
            inference_weight = weight.clone()  # no version counter: never kept
            assert_close(_call(linear, x, inference_weight, *args[2:]), _expected(linear, *args), torch.float32)
        _call(linear, x, weight.transpose(1, 2).contiguous().transpose(1, 2), *args[2:])  # not contiguous
        assert _kept() == (0, 0)
        with keep_packed_weights(budget_mb=0):  # nothing fits
            assert_close(_call(linear, *args), _expected(linear, *args), torch.float32)
            assert _kept() == (0, 0)
        assert pruned_weight_cache()["budget_mb"] == 64  # the outer budget is back
        _call(linear, *args)
        assert _kept()[0] == 3
    assert pruned_weight_cache() == {"entries": 0, "bytes": 0, "budget_mb": 0}
    _call(linear, *args)
    assert _kept() == (0, 0)
    for budget in (-1, 1.5):
        with pytest.raises(ValueError, match=r"budget_mb must be an int in \[0, 2\*\*62\) \(MiB\)"):
            with keep_packed_weights(budget):
                pass


def test_kept_packed_weights_blocks_exiting_out_of_order():
    """A systems trial: blocks in two threads that exit out of order (A enters, B enters, A
    exits, B exits) left the budget on after both, and later calls used stale weights."""
    pruned_weight_cache(clear=True)
    a, b = keep_packed_weights(100), keep_packed_weights(200)
    a.__enter__()
    b.__enter__()
    assert pruned_weight_cache()["budget_mb"] == 200
    a.__exit__(None, None, None)
    assert pruned_weight_cache()["budget_mb"] == 200  # B's block is still open
    b.__exit__(None, None, None)
    assert pruned_weight_cache() == {"entries": 0, "bytes": 0, "budget_mb": 0}
    with pytest.raises(ValueError, match="budget_mb must be an int"):
        with keep_packed_weights(2**70):
            pass


def test_kept_packed_weights_warn_once_when_a_trained_weight_meets_them(monkeypatch):
    """Found by an op-level trial: a fused optimizer step (fused=True) updates weights without a
    version bump, so a static plan served stale packed weights in a training loop; a
    grad-enabled call on a weight that requires grad now warns (once) inside the plan."""
    import warnings

    import mmfast.ops.pruned as pruned_module

    monkeypatch.setattr(pruned_module, "_warned_kept_while_training", False)
    x, weight, bias, sample_codes, in_mask, out_mask = _cached_layer(False)
    weight = weight.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, padding=1)  # no plan: silent
        with keep_packed_weights(budget_mb=64), torch.no_grad():  # sampling: silent
            masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, padding=1)
    with keep_packed_weights(budget_mb=64):
        with pytest.warns(UserWarning, match="fused=True"):
            masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, padding=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once
            masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, padding=1)


@pytest.mark.parametrize("value, expected", [("48", "48"), ("", "0"), ("-3", "must be a whole number"),
                                             ("1e3", "must be a whole number"), ("+5", "must be a whole number")])
def test_packed_weight_budget_from_the_environment(value, expected):
    script = ("import torch, mmfast\n"
              "from mmfast.ops import masked_linear, pruned_weight_cache\n"
              "x, w = torch.randn(2, 3, 4), torch.randn(1, 5, 4)\n"
              "mask_in, mask_out = torch.tensor([[1, 0, 1, 1]], dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool)\n"
              "masked_linear(x, w, None, torch.zeros(2, dtype=torch.long), mask_in, mask_out)\n"
              "print(pruned_weight_cache()['budget_mb'])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=dict(os.environ, MMFAST_PRUNED_WEIGHT_CACHE_MB=value))
    if expected.isdigit():  # the printed budget itself ("0" is also in the default "1024")
        assert result.returncode == 0 and result.stdout.strip() == expected, result.stderr[-2000:]
    else:
        assert result.returncode != 0 and expected in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("device", NATIVE)
def test_masked_inputs_are_never_read(device):
    batch, codes, cin, cout = 4, 2, 8, 6
    x = torch.randn(batch, cin, 5, 5, device=device)
    weight, bias = torch.randn(codes, cout, cin, 3, 3, device=device), torch.randn(codes, cout, device=device)
    sample_codes, in_mask, out_mask = make_routing(batch, codes, cin, cout, device)
    poisoned = x.clone()
    poisoned[~in_mask[sample_codes.long()]] = float("nan")
    y = masked_conv2d(poisoned, weight, bias, sample_codes, in_mask, out_mask, padding=1)
    torch.testing.assert_close(y, masked_conv2d(x, weight, bias, sample_codes, in_mask, out_mask, padding=1))
    assert not y.isnan().any()


@pytest.mark.parametrize("device", NATIVE)
def test_shared_weights_unsorted_strided_and_channels_last_inputs(device):
    batch, codes, cin, cout = 6, 4, 10, 12
    x = torch.randn(batch, cin, 2 * 7, 6, device=device)[:, :, ::2]  # non-contiguous rows
    weight, bias = torch.randn(1, cout, cin, 3, 3, device=device), torch.randn(1, cout, device=device)
    sample_codes, in_mask, out_mask = make_routing(batch, codes, cin, cout, device)
    expected = sliced_conv(x, weight, bias, sample_codes, in_mask, out_mask, padding=1)
    for xi in (x, x.contiguous(memory_format=torch.channels_last)):
        y = masked_conv2d(xi, weight, bias, sample_codes, in_mask, out_mask, padding=1)
        assert_close(y, expected, torch.float32)
    # a batch sorted by code (the CPU slices instead of gathering) gives the same rows
    order = torch.argsort(sample_codes.cpu(), stable=True).to(device)
    y = masked_conv2d(x[order], weight, bias, sample_codes[order].int(), in_mask, out_mask, padding=1)
    assert_close(y, expected[order], torch.float32)


@pytest.mark.parametrize("device", NATIVE)
def test_masks_that_keep_nothing(device):
    x, weight, bias = (torch.randn(3, 5, 4, 4, device=device), torch.randn(2, 6, 5, 3, 3, device=device),
                       torch.randn(2, 6, device=device))
    codes = torch.tensor([0, 1, 0], device=device)
    none_in = torch.zeros(2, 5, dtype=torch.bool, device=device)
    all_out = torch.ones(2, 6, dtype=torch.bool, device=device)
    y = masked_conv2d(x, weight, bias, codes, none_in, all_out, padding=1)  # nothing read: the bias alone
    torch.testing.assert_close(y, bias[codes][:, :, None, None].expand(3, 6, 4, 4))
    y = masked_conv2d(x, weight, None, codes, all_out[:, :5], ~all_out, padding=1)
    assert (y == 0).all() and y.shape == (3, 6, 4, 4)


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("height, width", [(0, 5), (4, 0), (0, 0)])
def test_empty_input_plane(backend_device, height, width):
    """x of height or width 0 is refused as F.conv2d refuses it, even where padding would give an
    output: one ValueError on every backend, nothing launched (the CUDA kernels' own handling of
    a null x: tests/cuda_emulator/test_pruned_emulated.cpp). With B or Cin 0 it is accepted, as
    F.conv2d accepts it: an empty batch, or the bias alone."""
    backend, device = backend_device
    codes, mask = torch.tensor([1, 0, 1], device=device), torch.ones(2, 5, dtype=torch.bool, device=device)
    weight, bias = torch.randn(2, 6, 5, 3, 3, device=device), torch.randn(2, 6, device=device)
    x, out_mask = torch.randn(3, 5, height, width, device=device), torch.ones(2, 6, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match=f"height and width must be >= 1 unless B or Cin is 0 .* got {height}x{width}"):
        masked_conv2d(x, weight, None, codes, mask, out_mask, padding=2, backend=backend)
    if backend == "native":  # the op itself (no Python wrapper): the C++ check
        with pytest.raises(ValueError, match="height and width must be >= 1"):
            torch.ops.mmfast.masked_conv2d(x, weight, None, codes, mask, out_mask, [1, 1], [2, 2], [1, 1])
    empty_batch = masked_conv2d(x[:0], weight, bias, codes[:0], mask, out_mask, padding=2, backend=backend)
    assert empty_batch.shape == (0, 6, height + 2, width + 2)
    no_channels = masked_conv2d(x[:, :0], weight[:, :, :0], bias, codes, mask[:, :0], out_mask, padding=2,
                                backend=backend)
    torch.testing.assert_close(no_channels, bias[codes][:, :, None, None].expand(3, 6, height + 2, width + 2))


@pytest.mark.parametrize("device", NATIVE)
def test_zero_sized_channels_and_batch(device):
    codes = torch.tensor([0, 1, 0], device=device)
    ones = (lambda k, c: torch.ones(k, c, dtype=torch.bool, device=device))
    # Cin = 0: the bias alone; Cout = 0: an empty result
    y = masked_conv2d(torch.randn(3, 0, 5, 5, device=device), torch.randn(2, 6, 0, 3, 3, device=device),
                      torch.ones(2, 6, device=device), codes, ones(2, 0), ones(2, 6), padding=1)
    assert y.shape == (3, 6, 5, 5) and (y == 1).all()
    y = masked_linear(torch.randn(3, 4, 0, device=device), torch.randn(2, 6, 0, device=device),
                      torch.ones(2, 6, device=device), codes, ones(2, 0), ones(2, 6))
    assert y.shape == (3, 4, 6) and (y == 1).all()
    assert masked_conv2d(torch.randn(3, 5, 4, 4, device=device), torch.randn(2, 0, 5, 3, 3, device=device), None,
                         codes, ones(2, 5), ones(2, 0)).shape == (3, 0, 2, 2)
    assert masked_linear(torch.randn(3, 4, 5, device=device), torch.randn(2, 0, 5, device=device), None, codes,
                         ones(2, 5), ones(2, 0)).shape == (3, 4, 0)
    # B = 0 and Cin = 0, forward and backward: zero gradients on the reference too (an op-level
    # trial found its output cut off from the graph there)
    for backend in ("native", "reference"):
        for batch, cin in ((0, 5), (3, 0)):
            x = torch.randn(batch, cin, 4, 4, device=device, requires_grad=True)
            w = torch.randn(2, 6, cin, 3, 3, device=device, requires_grad=True)
            y = masked_conv2d(x, w, None, codes[:batch], ones(2, cin), ones(2, 6), padding=1, backend=backend)
            y.sum().backward()
            assert y.shape == (batch, 6, 4, 4) and x.grad.shape == x.shape and (w.grad == 0).all()
            x = torch.randn(batch, 4, cin, device=device, requires_grad=True)
            w = torch.randn(2, 6, cin, device=device, requires_grad=True)
            masked_linear(x, w, None, codes[:batch], ones(2, cin), ones(2, 6), backend=backend).sum().backward()
            assert x.grad.shape == x.shape and (w.grad == 0).all()


def test_group_norm_reference_output_is_contiguous_for_channels_last_x():
    """The reference masked_group_norm returns a contiguous tensor like the kernels (and the
    fake kernel), also for a channels-last x."""
    x = torch.randn(3, 8, 3, 3).to(memory_format=torch.channels_last)
    codes, mask = torch.tensor([0, 1, 0]), torch.ones(2, 8, dtype=torch.bool)
    y = masked_group_norm(x, None, None, 4, codes, mask, backend="reference")
    assert y.is_contiguous()
    torch.testing.assert_close(y, masked_group_norm(x.contiguous(), None, None, 4, codes, mask))


def test_group_norm_is_accurate_on_sd_sized_groups():
    """A group of the 320-channel level at 96x96 (92,160 elements), mean far from 0: fp32 within
    the fp32 tolerance of the fp64 result, as torch's GroupNorm is."""
    x = torch.randn(1, 320, 96, 96) * 0.5 + 8
    codes, mask = torch.tensor([0]), torch.ones(1, 320, dtype=torch.bool)
    y = masked_group_norm(x, None, None, 32, codes, mask)
    assert_close(y, F.group_norm(x.double(), 32), torch.float32)


def sliced_linear(x, weight, bias, sample_codes, in_mask, out_mask):
    y = torch.zeros(*x.shape[:2], weight.shape[1], dtype=torch.float64)
    for b, code in enumerate(sample_codes.tolist()):
        w = weight[code if weight.shape[0] > 1 else 0].double().cpu()
        kin, kout = in_mask[code].nonzero()[:, 0].cpu(), out_mask[code].nonzero()[:, 0].cpu()
        bias_c = None if bias is None else bias[code if bias.shape[0] > 1 else 0].double().cpu()[kout]
        y[b][:, kout] = F.linear(x[b][:, kin].double().cpu(), w[kout][:, kin], bias_c)
    return y


@pytest.mark.parametrize("device", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True], ids=["per-code", "shared"])
def test_linear_equals_each_sliced_expert(device, dtype, shared):
    batch, tokens, codes, cin, cout = 5, 11, 3, 24, 40  # heads of 8, FF groups
    x = torch.randn(batch, tokens, cin, device=device).to(dtype)
    weight = torch.randn(1 if shared else codes, cout, cin, device=device).to(dtype)
    bias = None if shared else torch.randn(codes, cout, device=device).to(dtype)
    sample_codes, in_mask, out_mask = make_routing(batch, codes, cin, cout, device, groups=5)
    y = masked_linear(x, weight, bias, sample_codes, in_mask, out_mask)
    assert y.shape == (batch, tokens, cout) and y.dtype == dtype and y.is_contiguous()
    expected = sliced_linear(x, weight, bias, sample_codes, in_mask, out_mask)
    assert_close(y.cpu(), expected, dtype)
    # a transposed (non-contiguous) x gives the same result
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(masked_linear(xt, weight, bias, sample_codes, in_mask, out_mask), y)


@pytest.mark.parametrize("device", NATIVE)
@pytest.mark.parametrize("sorted_rows", [False, True], ids=["unsorted", "sorted"])
def test_linear_reads_half_of_a_projection_in_place(device, sorted_rows):
    """x = one half of a (B, N, 2C) projection (AptpUNet's GEGLU: token rows at stride 2C, read
    where they are on the CPU): the same as the contiguous copy, the other half never read
    (NaN), for gathered rows and for sorted rows whose code keeps every input (sliced)."""
    batch, tokens, codes, cin, cout = 6, 7, 3, 24, 16
    projection = torch.randn(batch, tokens, 2 * cin, device=device)
    projection[..., cin:] = float("nan")
    x = projection[..., :cin]
    weight, bias = torch.randn(codes, cout, cin, device=device), torch.randn(codes, cout, device=device)
    sample_codes, in_mask, out_mask = make_routing(batch, codes, cin, cout, device, groups=4)
    in_mask[0] = True  # code 0 keeps every input: sorted, its rows are sliced, not gathered
    if sorted_rows:
        sample_codes = torch.sort(sample_codes).values
    y = masked_linear(x, weight, bias, sample_codes, in_mask, out_mask)
    torch.testing.assert_close(y, masked_linear(x.contiguous(), weight, bias, sample_codes, in_mask, out_mask),
                               rtol=0, atol=0)
    assert_close(y.cpu(), sliced_linear(x, weight, bias, sample_codes, in_mask, out_mask), torch.float32)
    # one row, one token, and rows expanded from one (stride 0): copied, the same result
    for xi, ci in ((x[:1], sample_codes[:1]), (x[:, :1], sample_codes), (x[:1].expand(batch, -1, -1), sample_codes)):
        assert_close(masked_linear(xi, weight, bias, ci, in_mask, out_mask).cpu(),
                     sliced_linear(xi, weight, bias, ci, in_mask, out_mask), torch.float32)


@pytest.mark.parametrize("device", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_linear_keeping_every_output_equals_each_sliced_expert(device, dtype, with_bias):
    """Codes keeping every output and some inputs (an attention out-projection, the feed-forward's
    second linear), or no input (code 3: the bias alone): rows sorted by code (the CPU kernel's
    GEMM writes y's rows in place) and out of order (gathered and scattered) both equal the
    sliced experts; the masked inputs hold NaN and are never read."""
    batch, tokens, codes, cin, cout = 8, 7, 4, 24, 16
    g = torch.Generator().manual_seed(5)
    in_mask = torch.rand(codes, cin, generator=g) < 0.6
    in_mask[:, 0] = True
    in_mask[3] = False
    out_mask = torch.ones(codes, cout, dtype=torch.bool)
    weight = torch.randn(codes, cout, cin, generator=g).to(dtype)
    bias = torch.randn(codes, cout, generator=g).to(dtype) if with_bias else None
    x = torch.randn(batch, tokens, cin, generator=g).to(dtype)
    sorted_codes = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    shuffle = torch.tensor([5, 0, 3, 6, 1, 4, 7, 2])
    for sample_codes, xs in ((sorted_codes, x), (sorted_codes[shuffle], x[shuffle])):
        x_nan = xs.masked_fill(~in_mask[sample_codes][:, None, :], float("nan"))
        args = [t.to(device) if t is not None else None for t in (x_nan, weight, bias, sample_codes, in_mask, out_mask)]
        y = masked_linear(*args)
        assert_close(y.cpu(), sliced_linear(xs, weight, bias, sample_codes, in_mask, out_mask), dtype)


@pytest.mark.parametrize("device", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["per-code", "shared", "none"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_equals_the_pruned_experts_group_norm(device, dtype, affine, activation):
    batch, codes, channels, groups = 5, 3, 30, 3  # group size 10, as SD 2.1's 320-channel level
    x = (torch.randn(batch, channels, 6, 5, device=device) * 3 + 1).to(dtype)
    g = torch.Generator().manual_seed(3)
    kept_groups = torch.rand(codes, groups, generator=g) < 0.6
    kept_groups[0] = True  # code 0 keeps everything: the dense GroupNorm
    mask = kept_groups.repeat_interleave(channels // groups, 1).to(device)
    sample_codes = torch.tensor([0, 2, 1, 2, 0], device=device)
    shape = {"per-code": (codes, channels), "shared": (channels,)}.get(affine)
    weight = None if shape is None else torch.randn(shape, device=device).to(dtype)
    bias = None if shape is None else torch.randn(shape, device=device).to(dtype)
    y = masked_group_norm(x, weight, bias, groups, sample_codes, mask, activation=activation)
    assert y.dtype == dtype and y.shape == x.shape
    for b, code in enumerate(sample_codes.tolist()):
        kept = mask[code].nonzero()[:, 0]
        if kept.numel() == 0:
            assert (y[b] == 0).all()
            continue
        per_code = (lambda t: None if t is None else (t[code] if t.dim() == 2 else t).double()[kept])
        expected = F.group_norm(x[b:b + 1, kept].double(), int(kept_groups[code].sum()), per_code(weight),
                                per_code(bias), eps=1e-5)
        if activation == "silu":
            expected = F.silu(expected)
        assert_close(y[b:b + 1, kept], expected, dtype)
        assert (y[b][mask[code].logical_not()] == 0).all()
    # non-contiguous x (channels-last, every other row) through the same kernel: the same values
    for strided in (x.contiguous(memory_format=torch.channels_last), torch.repeat_interleave(x, 2, dim=2)[:, :, ::2]):
        assert not strided.is_contiguous()
        torch.testing.assert_close(masked_group_norm(strided, weight, bias, groups, sample_codes, mask,
                                                     activation=activation), y, rtol=0, atol=0)


@pytest.mark.parametrize("device", NATIVE)
def test_group_norm_partial_groups_2d_and_5d_inputs_match_the_reference(device):
    codes = torch.tensor([1, 0, 1], device=device)
    mask = torch.rand(2, 12, generator=torch.Generator().manual_seed(5)).lt(0.5).to(device)  # partial groups
    weight = torch.randn(2, 12, device=device)
    for shape in [(3, 12), (3, 12, 2, 3, 4)]:
        x = torch.randn(shape, device=device)
        y = masked_group_norm(x, weight, None, 4, codes, mask, eps=1e-3)
        expected = reference.masked_group_norm_ref(x.double(), weight.double(), None, 4, codes, mask, 1e-3)
        assert_close(y, expected, torch.float32)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_group_norm_takes_a_1_by_c_affine_as_shared(backend):
    """A (1, C) weight / bias means shared, as masked_conv2d's K = 1 weight does (a new user
    passed one by analogy and was refused); gradients reach it."""
    codes = torch.tensor([1, 0, 1])
    mask = torch.tensor([[True] * 4 + [False] * 4, [True] * 8])
    x = torch.randn(3, 8, 2, 2, dtype=torch.float64)
    weight = torch.randn(1, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64)  # one of each form
    y = masked_group_norm(x, weight, bias, 4, codes, mask, activation="silu", backend=backend)
    expected = masked_group_norm(x, weight.detach()[0], bias, 4, codes, mask, activation="silu", backend=backend)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.sum().backward()
    assert weight.grad.shape == (1, 8) and weight.grad[0, :4].abs().sum() > 0
    per_code = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)  # forms mixed: (K, C) with (1, C)
    y = masked_group_norm(x, per_code, bias[None], 4, codes, mask, backend=backend)
    expected = masked_group_norm(x, per_code.detach(), bias.expand(2, 8), 4, codes, mask, backend=backend)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.sum().backward()
    assert per_code.grad.shape == (2, 8)
    # invalid forms are passed as given: the error names the argument and the shape the caller passed
    for w, b, name, shape in ((torch.randn(1, 7), None, "weight", r"[(\[]1, 7[)\]]"),  # native: [1, 7]
                              (torch.randn(8), torch.randn(3, 8), "bias", r"[(\[]3, 8[)\]]"),
                              (torch.randn(2, 8), torch.randn(1, 7), "bias", r"[(\[]1, 7[)\]]")):
        with pytest.raises(ValueError, match=f"{name} must be .* got shape {shape}"):
            masked_group_norm(x, None if w is None else w.double(), None if b is None else b.double(), 4, codes, mask,
                              backend=backend)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_group_norm_backward_never_reads_masked_affine_slots(backend):
    """Found by an op-level trial: a NaN in a masked channel's weight slot (never read by the
    forward) reached the kept channels' grad_x through 0 * NaN in the backward."""
    codes = torch.tensor([0, 1])
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    clean_w, clean_b = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    poisoned_w, poisoned_b = clean_w.clone(), clean_b.clone()
    poisoned_w[0, 2] = poisoned_b[0, 2] = poisoned_w[1, 4] = float("nan")
    grads = []
    for w, b in ((clean_w, clean_b), (poisoned_w, poisoned_b)):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        masked_group_norm(xs, ws, bs, 3, codes, mask, activation="silu", backend=backend).square().sum().backward()
        grads.append((xs.grad, ws.grad, bs.grad))
    for clean, poisoned in zip(*grads):
        assert not poisoned.isnan().any()
        torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


@pytest.mark.parametrize("device", NATIVE)
def test_group_norm_never_reads_masked_channels(device):
    codes = torch.tensor([0, 1], device=device)
    mask = torch.tensor([[True] * 4 + [False] * 4, [False] * 4 + [True] * 4], device=device)
    x = torch.randn(2, 8, 3, 3, device=device)
    poisoned = torch.where(mask[codes][:, :, None, None], x, float("nan"))
    y = masked_group_norm(poisoned, None, None, 2, codes, mask, activation="silu")
    torch.testing.assert_close(y, masked_group_norm(x, None, None, 2, codes, mask, activation="silu"))
    assert not y.isnan().any()


# ---- gradients, opcheck, torch.compile --------------------------------------------------------------------


def _leaf(t):
    return t.detach().double().requires_grad_()


@pytest.mark.parametrize("device", NATIVE)
@pytest.mark.parametrize("stacked", [3, 1], ids=["per-code", "shared"])
def test_gradcheck_fp64(device, stacked):
    sample_codes, in_mask, out_mask = make_routing(4, 3, 5, 6, device, groups=3)
    x = _leaf(torch.randn(4, 5, 5, 4, device=device))
    w, b = _leaf(torch.randn(stacked, 6, 5, 3, 3, device=device)), _leaf(torch.randn(stacked, 6, device=device))
    torch.autograd.gradcheck(lambda x, w, b: masked_conv2d(x, w, b, sample_codes, in_mask, out_mask, stride=2,
                                                           padding=1), (x, w, b))
    xl, wl = _leaf(torch.randn(4, 3, 5, device=device)), _leaf(torch.randn(stacked, 6, 5, device=device))
    torch.autograd.gradcheck(lambda x, w, b: masked_linear(x, w, b, sample_codes, in_mask, out_mask), (xl, wl, b))
    xg = _leaf(torch.randn(4, 6, 3, 2, device=device))
    gw, gb = (_leaf(torch.randn(6, device=device)), _leaf(torch.randn(6, device=device))) if stacked == 1 else \
        (_leaf(torch.randn(3, 6, device=device)), _leaf(torch.randn(3, 6, device=device)))
    torch.autograd.gradcheck(lambda x, w, b: masked_group_norm(x, w, b, 3, sample_codes, out_mask,
                                                               activation="silu"), (xg, gw, gb))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_no_output_channels_backward(backend):
    """Cout = 0: the forward gives (B, 0, H, W) (F.conv2d refuses it); the backward gives zero
    gradients of x (the native one ran a grouped convolution with no weight and raised)."""
    sample_codes, in_mask, _ = make_routing(4, 3, 5, 6, "cpu", groups=3)
    out_mask = torch.ones(3, 0, dtype=torch.bool)
    x, w = torch.randn(4, 5, 5, 5, requires_grad=True), torch.randn(3, 0, 5, 3, 3, requires_grad=True)
    y = masked_conv2d(x, w, None, sample_codes, in_mask, out_mask, padding=1, backend=backend)
    assert y.shape == (4, 0, 5, 5)
    grad_x, grad_w = torch.autograd.grad(y.sum(), (x, w))
    assert torch.equal(grad_x, torch.zeros_like(x)) and grad_w.shape == w.shape


@pytest.mark.parametrize("op", ["conv2d", "linear"])
def test_reference_under_cpu_autocast_matches_native(op):
    """Under CPU bf16 autocast the reference's fp32 convs / GEMMs were lowered to bf16 again and
    its index_put raised on the dtype mismatch; it now sums in fp32 as outside autocast."""
    sample_codes, in_mask, out_mask = make_routing(4, 3, 5, 6, "cpu", groups=3)
    if op == "conv2d":
        x, w = torch.randn(4, 5, 6, 5), torch.randn(3, 6, 5, 3, 3)
        call = lambda backend: masked_conv2d(x, w, None, sample_codes, in_mask, out_mask, padding=1,  # noqa: E731
                                             backend=backend)
    else:
        x, w = torch.randn(4, 7, 5), torch.randn(3, 6, 5)
        call = lambda backend: masked_linear(x, w, None, sample_codes, in_mask, out_mask, backend=backend)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native, reference = call("native"), call("reference")
    assert native.dtype == reference.dtype == torch.bfloat16
    assert_close(reference, native, torch.bfloat16)


def _op_args(device, requires_grad=False):
    sample_codes, in_mask, out_mask = make_routing(4, 3, 5, 6, device, groups=3)
    conv = (torch.randn(4, 5, 6, 5, device=device), torch.randn(3, 6, 5, 3, 3, device=device),
            torch.randn(3, 6, device=device), sample_codes, in_mask, out_mask, [2, 1], [1, 1], [1, 1])
    linear = (torch.randn(4, 7, 5, device=device), torch.randn(1, 6, 5, device=device), None, sample_codes.int(),
              in_mask, out_mask)
    norm = (torch.randn(4, 6, 3, 2, device=device), torch.randn(3, 6, device=device),
            torch.randn(3, 6, device=device), 3, sample_codes, out_mask, 1e-5, True)
    if requires_grad:
        for args in (conv, linear, norm):
            for t in args[:3]:
                if isinstance(t, torch.Tensor):
                    t.requires_grad_()
    return {"masked_conv2d": conv, "masked_linear": linear, "masked_group_norm": norm}


@pytest.mark.parametrize("device", NATIVE)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    for op, args in _op_args(device, requires_grad).items():
        torch.library.opcheck(getattr(torch.ops.mmfast, op).default, args)


@pytest.mark.parametrize("device", NATIVE)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    sample_codes, in_mask, out_mask = make_routing(4, 3, 5, 6, device, groups=3)
    w1, w2 = torch.randn(3, 6, 5, 3, 3, device=device), torch.randn(3, 5, 6, 3, 3, device=device)
    gn_w = torch.randn(3, 6, device=device)

    def resnet_inside(x):
        h = masked_conv2d(x, w1, None, sample_codes, in_mask[:, :5], out_mask, padding=1)
        h = masked_group_norm(h, gn_w, None, 3, sample_codes, out_mask, activation="silu")
        h = masked_conv2d(h, w2, None, sample_codes, out_mask, torch.ones_like(in_mask), padding=1)
        return masked_linear(h.flatten(2).transpose(1, 2), w1[:, :, :, 1, 1], None, sample_codes, in_mask[:, :5],
                             out_mask)

    x = torch.randn(4, 5, 6, 6, device=device)
    compiled = torch.compile(resnet_inside, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), resnet_inside(x))


def test_group_norm_compiles_once_for_any_channel_count():
    """torch.compile(dynamic=True): masked_group_norm's weight forms were keyed by shape tuples in a
    dict, and hashing the symbolic C (and K) recompiled for every new value (past the recompile
    limit dynamo falls back to eager silently)."""
    torch._dynamo.reset()
    norm = torch.compile(lambda x, w, codes, mask: masked_group_norm(x, w, None, 2, codes, mask),
                         fullgraph=True, dynamic=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=False):
        # sizes that differ unless they must agree (dynamo's duck sizing ties equal ones together)
        norm(torch.randn(5, 4, 7, 9), torch.randn(4), torch.tensor([0, 1, 2, 0, 1]), torch.ones(3, 4, dtype=torch.bool))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for channels, codes in ((6, 4), (8, 6), (12, 11)):
            x, w = torch.randn(5, channels, 7, 9), torch.randn(channels)
            mask = torch.ones(codes, channels, dtype=torch.bool)
            torch.testing.assert_close(norm(x, w, torch.tensor([0, 1, 2, 0, 1]), mask),
                                       masked_group_norm(x, w, None, 2, torch.tensor([0, 1, 2, 0, 1]), mask))


# ---- errors ---------------------------------------------------------------------------------------------------


def _conv_inputs(**change):
    args = dict(x=torch.randn(3, 4, 5, 5), weight=torch.randn(2, 6, 4, 3, 3), bias=torch.randn(2, 6),
                sample_codes=torch.tensor([0, 1, 0]), in_mask=torch.ones(2, 4, dtype=torch.bool),
                out_mask=torch.ones(2, 6, dtype=torch.bool))
    args.update(change)
    return args


BAD_CONV = {
    "code out of range": (dict(sample_codes=torch.tensor([0, 2, 0])), IndexError, "sample code 2 .*out of range"),
    "negative code": (dict(sample_codes=torch.tensor([0, -1, 0])), IndexError, "out of range for 2"),
    "float codes": (dict(sample_codes=torch.tensor([0.0, 1.0, 0.0])), TypeError, "sample_codes must be int64"),
    "codes per sample": (dict(sample_codes=torch.tensor([0, 1])), ValueError, r"sample_codes must be \(3,\)"),
    "in_mask channels": (dict(in_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"in_mask must be \(K, 4\)"),
    "masks disagree on K": (dict(out_mask=torch.ones(3, 6, dtype=torch.bool)), ValueError, "agree on the number"),
    "mask dtype": (dict(in_mask=torch.ones(2, 4)), TypeError, "in_mask must be a bool"),
    "weight codes": (dict(weight=torch.randn(3, 6, 4, 3, 3)), ValueError, r"weight must be \(2 or 1,"),
    "weight rank": (dict(weight=torch.randn(6, 4, 3, 3)), ValueError, "5-D"),
    "weight Cin": (dict(weight=torch.randn(2, 6, 5, 3, 3)), ValueError, "must equal x's 4 channels"),
    "bias shape": (dict(bias=torch.randn(2, 5)), ValueError, r"bias must be \(2 or 1,"),
    "mixed dtypes": (dict(weight=torch.randn(2, 6, 4, 3, 3).double()), TypeError, "same dtype"),
    "integer x": (dict(x=torch.ones(3, 4, 5, 5, dtype=torch.int32)), TypeError, "float32"),
    "mixed devices": (dict(x=torch.randn(3, 4, 5, 5, device="meta")), TypeError, "same device"),
}


@pytest.mark.parametrize("case", list(BAD_CONV))
@pytest.mark.parametrize("entry", ["public", "torch.ops"])
def test_bad_conv_inputs_raise_clear_errors(case, entry):
    change, error, message = BAD_CONV[case]
    args = _conv_inputs(**change)
    with pytest.raises(error, match=message):
        if entry == "public":
            masked_conv2d(**args, padding=1)
        else:
            torch.ops.mmfast.masked_conv2d(*args.values(), [1, 1], [1, 1], [1, 1])


def test_bad_options_and_other_ops_raise_clear_errors():
    args = _conv_inputs()
    with pytest.raises(TypeError, match="sample_codes must be a torch.Tensor, got list"):
        masked_conv2d(**{**args, "sample_codes": [0, 1, 0]})
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        masked_conv2d(**args, stride=0)
    with pytest.raises(ValueError, match="does not fit the padded"):
        masked_conv2d(**args, dilation=3)
    with pytest.raises(ValueError, match="does not fit the padded"):
        torch.ops.mmfast.masked_conv2d(*args.values(), [1, 1], [0, 0], [3, 3])
    codes, mask = args["sample_codes"], args["out_mask"]
    with pytest.raises(ValueError, match=r"x must be a 3-D \(B, N, Cin\)"):
        masked_linear(torch.randn(3, 4), torch.randn(2, 6, 4), None, codes, args["in_mask"], mask)
    with pytest.raises(ValueError, match="num_groups must divide the 6 channels"):
        masked_group_norm(torch.randn(3, 6, 2), None, None, 4, codes, mask)
    with pytest.raises(ValueError, match="activation must be one of"):
        masked_group_norm(torch.randn(3, 6, 2), None, None, 3, codes, mask, activation="gelu")
    one_code = torch.ones(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"weight must be \(1, .*6, 4\): one set per code \(the masks give K = 1 "):
        masked_linear(torch.randn(3, 2, 4), torch.randn(2, 6, 4), None, torch.zeros(3, dtype=torch.long),
                      torch.ones(1, 4, dtype=torch.bool), one_code)  # not "(1 or 1, ...)"
    x = torch.randn(3, 6, 2)  # numpy scalars are numbers too
    assert torch.equal(masked_group_norm(x, None, None, np.int64(3), codes, mask, eps=np.float32(1e-5)),
                       masked_group_norm(x, None, None, 3, codes, mask, eps=float(np.float32(1e-5))))
    with pytest.raises(ValueError, match="num_groups must be an int >= 1, got 3.0"):  # not the schema's error
        masked_group_norm(torch.randn(3, 6, 2), None, None, 3.0, codes, mask)
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got inf"):
        masked_group_norm(torch.randn(3, 6, 2), None, None, 3, codes, mask, eps=float("inf"))
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints >= 1, got 1.0"):
        masked_conv2d(**args, stride=1.0)
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints >= 1, got True"):
        masked_conv2d(**args, stride=True)
    # numpy ints are ints (a new-user trial: refused as "must be an int")
    assert torch.equal(masked_conv2d(**args, stride=np.int64(2), padding=(np.int32(1), 1)),
                       masked_conv2d(**args, stride=2, padding=1))
    with pytest.raises(ValueError, match=r"weight must be \(6,\) shared or \(2, 6\) per code"):
        masked_group_norm(torch.randn(3, 6, 2), torch.randn(3, 6), None, 3, codes, mask)
    with pytest.raises(ValueError, match="both be shared"):  # the op itself takes one form (the API expands)
        torch.ops.mmfast.masked_group_norm(torch.randn(3, 6, 2), torch.randn(6), torch.randn(2, 6), 3, codes, mask,
                                           1e-5, False)
    with pytest.raises(IndexError, match="sample code 5"):
        masked_group_norm(torch.randn(3, 6, 2), None, None, 3, torch.tensor([0, 5, 1]), mask)
    with pytest.raises(IndexError, match="sample code 5"):
        masked_linear(torch.randn(3, 2, 4), torch.randn(2, 6, 4), None, torch.tensor([0, 5, 1]), args["in_mask"],
                      mask)
    # empty outputs (no output channels, no tokens, no pixels) check the codes all the same
    with pytest.raises(IndexError, match="sample code 5"):
        masked_conv2d(torch.randn(3, 4, 2, 2), torch.randn(2, 0, 4, 1, 1), None, torch.tensor([0, 5, 1]),
                      args["in_mask"], torch.ones(2, 0, dtype=torch.bool))
    with pytest.raises(IndexError, match="sample code 5"):
        masked_linear(torch.randn(3, 0, 4), torch.randn(2, 6, 4), None, torch.tensor([0, 5, 1]), args["in_mask"], mask)
    with pytest.raises(IndexError, match="sample code 5"):
        masked_group_norm(torch.randn(3, 6, 0), None, None, 3, torch.tensor([0, 5, 1]), mask)
