"""fp16 and bf16 on the native CPU kernels: storage only. Each op converts its 16-bit inputs to
fp32 exactly (simd.h's vector conversions, checked bit for bit against the scalar ones in
tests/cpp/test_decode_cpu.cpp), computes in fp32 and rounds the result once, so it must equal
the same op on the fp32-upcast inputs, rounded to the 16-bit dtype: bit for bit, on the ISA
copy this CPU runs. Odd sizes put elements in the scalar tails of the vector loops.

masked_conv2d / masked_linear run their dense convolutions and GEMMs through torch (oneDNN):
fp16 there is computed in fp32 where torch's CPU fp16 kernels are not oneDNN's (no AVX512-FP16
or AMX-FP16; ~100x slower than fp32), which the same identity checks.
"""
import pytest
import torch

from mmfast import ops

HALVES = [torch.float16, torch.bfloat16]


def _same(op, dtype, *args, **kwargs):
    """op (native backend) on the 16-bit tensors vs on their fp32 upcasts, rounded to dtype."""
    kwargs["backend"] = "native"
    def floats(t):
        return isinstance(t, torch.Tensor) and t.is_floating_point()

    low = op(*[t.to(dtype) if floats(t) else t for t in args], **kwargs)
    high = op(*[t.to(dtype).float() if floats(t) else t for t in args], **kwargs)
    assert low.dtype == dtype
    assert torch.equal(low, high.to(dtype)), f"max difference {(low.float() - high.to(dtype).float()).abs().max()}"


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("rows, in_features, out_features",
                         [(1, 768, 100), (1, 5, 3), (8, 3072, 51), (3, 37, 11), (1, 5003, 7)])  # M = 1, K > 4096: blocks
def test_decode_linear_computes_in_fp32(dtype, rows, in_features, out_features):
    torch.manual_seed(rows * in_features)
    _same(ops.decode_linear, dtype, torch.randn(rows, in_features), torch.randn(out_features, in_features),
          torch.randn(out_features))


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("queries, heads, kv_heads, head_dim", [(1, 8, 4, 64), (2, 4, 4, 40), (1, 2, 1, 256), (1, 3, 3, 7)])
def test_decode_attention_computes_in_fp32(dtype, queries, heads, kv_heads, head_dim):
    torch.manual_seed(head_dim)
    q = torch.randn(2, queries, heads, head_dim)
    k, v = torch.randn(2, 600, kv_heads, head_dim), torch.randn(2, 600, kv_heads, head_dim)
    _same(ops.decode_attention, dtype, q, k, v, torch.tensor([600, 17], dtype=torch.int32))


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("tokens, head_dim", [(500, 40), (33, 64), (70, 7)])
def test_linear_attention_computes_in_fp32(dtype, tokens, head_dim):
    torch.manual_seed(tokens)
    _same(ops.linear_attention, dtype, *(torch.randn(2, tokens, 3, head_dim) for _ in range(3)))


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("channels, groups, plane", [(40, 8, (9, 9)), (64, 32, (16, 16)), (6, 3, (5, 3))])
def test_masked_group_norm_computes_in_fp32(dtype, channels, groups, plane):
    torch.manual_seed(channels)
    codes, mask = torch.tensor([0, 2, 2, 1]), torch.rand(3, channels) < 0.6
    _same(ops.masked_group_norm, dtype, torch.randn(4, channels, *plane), torch.randn(3, channels),
          torch.randn(3, channels), groups, codes, mask)


def _fp16_conv_runs_in_fp32() -> bool:
    native = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_fp16_supported", None)
    return native is None or not native()


@pytest.mark.skipif(not _fp16_conv_runs_in_fp32(), reason="torch runs fp16 natively on this CPU (oneDNN)")
@pytest.mark.parametrize("code_2_inputs", ["one", "all", "none"])
def test_masked_conv2d_and_linear_compute_fp16_in_fp32(code_2_inputs):
    """Code 1 keeps everything (its weight converted whole), code 0 a random part, code 2 one
    input, every input or none (the bias alone)."""
    torch.manual_seed(len(code_2_inputs))
    codes = torch.tensor([0, 2, 2, 1])
    in_mask, out_mask = torch.rand(3, 48) < 0.6, torch.rand(3, 40) < 0.6
    in_mask[1] = out_mask[1] = True
    in_mask[2, :] = code_2_inputs == "all"
    in_mask[2, 0] = code_2_inputs != "none"
    bias = torch.randn(3, 40)
    _same(ops.masked_conv2d, torch.float16, torch.randn(4, 48, 9, 9), torch.randn(3, 40, 48, 3, 3), bias, codes,
          in_mask, out_mask, padding=1)
    _same(ops.masked_conv2d, torch.float16, torch.randn(4, 48, 9, 9), torch.randn(3, 40, 48, 3, 3), None, codes,
          in_mask, out_mask)
    _same(ops.masked_linear, torch.float16, torch.randn(4, 7, 48), torch.randn(3, 40, 48), bias, codes, in_mask,
          out_mask)
    # sorted by code and every output kept: the GEMM writes y's rows in place
    everything = torch.ones(3, 40, dtype=torch.bool)
    _same(ops.masked_linear, torch.float16, torch.randn(4, 7, 48), torch.randn(3, 40, 48), bias,
          torch.tensor([0, 0, 1, 1]), torch.ones(3, 48, dtype=torch.bool), everything)


@pytest.mark.skipif(not _fp16_conv_runs_in_fp32(), reason="torch runs fp16 natively on this CPU (oneDNN)")
def test_fp16_static_plan_keeps_the_converted_fp32_weights():
    """Under keep_packed_weights every code's fp16 weight is kept packed and converted to fp32
    (the dense code's too): the cache holds their fp32 bytes, and a second call serves them."""
    torch.manual_seed(0)
    codes = torch.tensor([0, 2, 2, 1])
    in_mask, out_mask = torch.rand(3, 48) < 0.6, torch.rand(3, 40) < 0.6
    in_mask[1] = out_mask[1] = True
    x, weight, bias = torch.randn(4, 48, 9, 9).half(), torch.randn(3, 40, 48, 3, 3).half(), torch.randn(3, 40).half()
    fp32_bytes = sum(int(out_mask[c].sum()) * int(in_mask[c].sum()) * 9 * 4 for c in range(3))
    want = ops.masked_conv2d(x.float(), weight.float(), bias.float(), codes, in_mask, out_mask, padding=1,
                             backend="native").half()
    with ops.keep_packed_weights():
        ops.pruned_weight_cache(clear=True)
        first = ops.masked_conv2d(x, weight, bias, codes, in_mask, out_mask, padding=1, backend="native")
        assert ops.pruned_weight_cache() == {"entries": 3, "bytes": fp32_bytes, "budget_mb": 1024}
        second = ops.masked_conv2d(x, weight, bias, codes, in_mask, out_mask, padding=1, backend="native")
        assert ops.pruned_weight_cache()["entries"] == 3
    assert torch.equal(first, want) and torch.equal(second, want)
