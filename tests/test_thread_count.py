"""Every native CPU op that splits its work over threads gives the same results at 1, 2 and 3
threads: bitwise where mmfast's kernels do all the arithmetic; for masked_conv2d / masked_linear,
whose products are ATen's conv / GEMM (not bitwise reproducible across thread counts on every
BLAS), mmfast's gathers and scatters are checked by exact zeros in the masked channels and a tight
tolerance elsewhere. Linear attention, decode_attention and vq_quantize have their own tests of
this (test_linear_attention_numerics, test_decode, test_vq); this file covers the other ops."""
from __future__ import annotations

import pytest
import torch

from mmfast.ops import (decode_linear, kv_cache_append, masked_conv2d, masked_group_norm, masked_linear, sample,
                        vq_dequantize)

from _utils import at_thread_counts, make_routing


def _generator():
    return torch.Generator().manual_seed(7)


def _kv_cache_append():
    g = _generator()
    k_cache, v_cache = torch.zeros(2, 6, 40, 3, 24)
    k, v = torch.randn(2, 6, 5, 3, 24, generator=g)
    lengths = torch.tensor([0, 3, 35, 7, 20, 11], dtype=torch.int32)

    def run():
        k_out, v_out = k_cache.clone(), v_cache.clone()
        kv_cache_append(k_out, v_out, k, v, lengths, backend="native")
        return k_out, v_out
    return run


def _sample():
    g = _generator()
    logits = torch.randn(12, 3000, generator=g) * 3
    uniform = torch.rand(12, generator=g)
    return lambda: sample(logits, temperature=0.9, top_k=200, top_p=0.9, uniform=uniform, return_status=True,
                          backend="native")


def _decode_linear():
    g = _generator()
    x = torch.randn(3, 300, generator=g)
    weight, bias = torch.randn(517, 300, generator=g), torch.randn(517, generator=g)
    return lambda: decode_linear(x, weight, bias, backend="native")


def _masked_conv2d():
    g = _generator()
    x = torch.randn(6, 12, 9, 11, generator=g)
    weight, bias = torch.randn(3, 10, 12, 3, 3, generator=g), torch.randn(3, 10, generator=g)
    routing = make_routing(6, 3, 12, 10, "cpu")
    return lambda: masked_conv2d(x, weight, bias, *routing, padding=1, backend="native")


def _masked_linear():
    g = _generator()
    x = torch.randn(5, 33, 24, generator=g)
    weight, bias = torch.randn(3, 20, 24, generator=g), torch.randn(3, 20, generator=g)
    routing = make_routing(5, 3, 24, 20, "cpu")
    return lambda: masked_linear(x, weight, bias, *routing, backend="native")


def _masked_group_norm():
    g = _generator()
    x = torch.randn(6, 40, 9, 7, generator=g) * 3 + 1
    weight, bias = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    sample_codes, mask, _ = make_routing(6, 3, 4, 4, "cpu")
    channel_mask = mask.repeat_interleave(10, 1)  # whole groups, as APTP prunes
    return lambda: masked_group_norm(x, weight, bias, 4, sample_codes, channel_mask, activation="silu",
                                     backend="native")


def _vq_dequantize():
    g = _generator()
    codebook = torch.randn(500, 24, generator=g)
    indices = torch.randint(0, 500, (3, 17, 19), generator=g)
    return lambda: vq_dequantize(indices, codebook, channels_first=True, backend="native")


BITWISE = {"kv_cache_append": _kv_cache_append, "sample": _sample, "decode_linear": _decode_linear,
           "masked_group_norm": _masked_group_norm, "vq_dequantize": _vq_dequantize}
ATEN_PRODUCTS = {"masked_conv2d": _masked_conv2d, "masked_linear": _masked_linear}


def _at_each_thread_count(run):
    """{count: run() as a tuple} for 1, 2 and 3 threads."""
    results = at_thread_counts(run)
    return {count: tuple(r) if isinstance(r, (tuple, list)) else (r,) for count, r in zip((1, 2, 3), results)}


@pytest.mark.parametrize("op", BITWISE)
def test_native_cpu_result_does_not_depend_on_the_thread_count(op):
    results = _at_each_thread_count(BITWISE[op]())
    for count in (2, 3):
        for index, (one, many) in enumerate(zip(results[1], results[count])):
            assert torch.equal(one, many), f"{op}: output {index} differs between 1 and {count} threads"


@pytest.mark.parametrize("op", ATEN_PRODUCTS)
def test_pruned_products_do_not_depend_on_the_thread_count(op):
    results = _at_each_thread_count(ATEN_PRODUCTS[op]())
    (one,) = results[1]
    for count in (2, 3):
        (many,) = results[count]
        assert torch.equal(one == 0, many == 0), f"{op}: zeros differ between 1 and {count} threads"
        torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)


def test_vq_dequantize_reports_the_first_bad_index_at_any_thread_count():
    """Threads race to report the smallest out-of-range position (vq_impl.h, LookupJob)."""
    codebook = torch.randn(500, 24)
    indices = torch.randint(0, 500, (3, 17, 19), generator=_generator())
    indices[0, 1, 2], indices[1, 5, 0], indices[2, 16, 18] = 777, -4, 500  # one per thread at 3

    def run():
        with pytest.raises(IndexError, match=r"index 777 is out of range .*position 21 of the indices"):
            vq_dequantize(indices, codebook, channels_first=True, backend="native")
        return ()
    _at_each_thread_count(run)
