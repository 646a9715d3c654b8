"""The pool of reused blocks behind mmfast's large CPU outputs (csrc/glue/cpu_output_pool.cpp,
mmfast.memory.cpu_output_pool): a freed output's block serves the next output of about its
size, idle blocks stay within the budget, pooled tensors behave like torch's (values, resize_,
freeing from another thread), and the settings fail loudly.

Outputs come from vq_dequantize (it allocates through the same empty_output as every op); the
env-var settings run in fresh processes (read once)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading

import pytest
import torch

from mmfast.memory import cpu_output_pool
from mmfast.ops import vq_dequantize

MIB = 1 << 20
CODEBOOK = torch.arange(4 * 1024, dtype=torch.float32).view(4, 1024)  # a row of 1024 fp32 is 4 KiB


def output(mib: int) -> torch.Tensor:
    """An output of exactly `mib` MiB (rows of CODEBOOK in a known order); from 8 MiB its block
    is advised huge pages and sized in 2 MiB steps."""
    rows = mib * 256
    return vq_dequantize(torch.arange(rows) % 4, CODEBOOK)


@pytest.fixture
def pool():
    """A pool with the default budget, emptied before and after (other tests' blocks aside)."""
    gc.collect()  # outputs in other tests' garbage cycles must not come back mid-test
    before = cpu_output_pool(budget_mb=512, clear=True)
    yield
    cpu_output_pool(budget_mb=before["budget_mb"], clear=True)


def test_a_freed_output_block_serves_the_next_output_of_its_size(pool):
    first = output(8)
    address, expected = first.data_ptr(), first.clone()
    live = cpu_output_pool()["live_bytes"]
    del first
    stats = cpu_output_pool()
    assert (stats["idle_blocks"], stats["idle_bytes"]) == (1, 8 * MIB)
    assert stats["live_bytes"] == live - 8 * MIB
    second = output(8)
    assert second.data_ptr() == address
    assert cpu_output_pool()["idle_blocks"] == 0
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    cpu_output_pool(budget_mb=0)  # the same output from torch's allocator: the same values
    torch.testing.assert_close(output(8), expected, rtol=0, atol=0)


def test_idle_blocks_stay_within_the_budget_oldest_released_first(pool):
    cpu_output_pool(budget_mb=20)
    outputs = [output(8) for _ in range(3)]
    last_freed = outputs[-1].data_ptr()
    while outputs:  # freed first to last
        outputs.pop(0)
    stats = cpu_output_pool()
    assert (stats["idle_blocks"], stats["idle_bytes"]) == (2, 16 * MIB)
    cpu_output_pool(budget_mb=10)  # a lower budget releases the oldest at once
    stats = cpu_output_pool()
    assert (stats["idle_blocks"], stats["idle_bytes"]) == (1, 8 * MIB)
    assert output(8).data_ptr() == last_freed


def test_a_block_much_larger_than_the_request_is_not_taken(pool):
    big = output(16)
    del big
    small = output(8)  # 16 MiB holds it, but twice over: a fresh block
    assert cpu_output_pool()["idle_blocks"] == 1
    del small
    assert cpu_output_pool()["idle_bytes"] == 24 * MIB


def test_a_block_larger_than_the_budget_is_released_at_once(pool):
    cpu_output_pool(budget_mb=12)
    del_now = output(16)
    del del_now
    assert cpu_output_pool()["idle_blocks"] == 0


def test_clear_releases_idle_blocks_and_budget_0_turns_the_pool_off(pool):
    kept = output(8)
    del kept
    assert cpu_output_pool(clear=True)["idle_blocks"] == 1
    assert cpu_output_pool()["idle_blocks"] == 0
    cpu_output_pool(budget_mb=0)
    live = cpu_output_pool()["live_bytes"]
    plain = output(8)
    assert cpu_output_pool()["live_bytes"] == live, "budget 0 still served an output from the pool"
    del plain
    assert cpu_output_pool()["idle_blocks"] == 0


def test_outputs_under_1_mib_are_not_pooled_and_small_blocks_fit_closely(pool):
    live = cpu_output_pool()["live_bytes"]
    small = vq_dequantize(torch.arange(255) % 4, CODEBOOK)  # 1 MiB - 4 KiB
    assert cpu_output_pool()["live_bytes"] == live and small.shape == (255, 1024)
    one = vq_dequantize(torch.arange(257) % 4, CODEBOOK)  # 1 MiB + 4 KiB: a 64 KiB-granular block
    assert cpu_output_pool()["live_bytes"] == live + MIB + (64 << 10)
    torch.testing.assert_close(one, CODEBOOK[torch.arange(257) % 4], rtol=0, atol=0)


def test_a_pooled_output_resizes_and_frees_like_any_tensor(pool):
    y = output(8)
    expected = y.clone()
    live = cpu_output_pool()["live_bytes"]
    y.resize_(y.shape[0] * 2, y.shape[1])  # the storage grows through the pool's allocator
    torch.testing.assert_close(y[: expected.shape[0]], expected, rtol=0, atol=0)
    assert cpu_output_pool()["live_bytes"] == live + 8 * MIB  # 16 MiB block instead of 8
    y[expected.shape[0]:] = 1.0
    assert y.sum().item() == expected.sum().item() + expected.numel()
    del y
    assert cpu_output_pool()["live_bytes"] == live - 8 * MIB


def test_outputs_freed_on_other_threads_come_back(pool):
    outputs = [output(8) for _ in range(4)]
    live = cpu_output_pool()["live_bytes"]
    threads = [threading.Thread(target=outputs.pop) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cpu_output_pool()
    assert stats["live_bytes"] == live - 32 * MIB
    assert (stats["idle_blocks"], stats["idle_bytes"]) == (4, 32 * MIB)


def test_bad_budgets_are_value_errors():
    # a systems trial: 1.5 and True were set as 1 MiB, "8" gave a bare comparison error, 2**70 the
    # schema's "expected int, found int"
    for bad in (-1, 1.5, True, "8", 2**70, torch.tensor(1.7), torch.tensor([2])):  # a float tensor passed as 1
        with pytest.raises(ValueError, match=r"budget_mb must be an int in \[0, 2\*\*62\) MiB"):
            cpu_output_pool(budget_mb=bad)
    before = cpu_output_pool(budget_mb=torch.tensor(64))  # one integer, as a tensor: taken
    assert cpu_output_pool(budget_mb=before["budget_mb"])["budget_mb"] == 64


def test_traced_peak_counts_storages_that_grow_and_tensors_made_from_data():
    """traced_peak_bytes (the LinFusion memory planner's tracer) counted a storage once, when
    an op made it: an out= result resized later, a resize_ and torch.tensor(data) counted 0-8 B."""
    from mmfast.memory import traced_peak_bytes

    a = torch.randn(512, 512)
    mib = 512 * 512 * 4

    def into_out():
        y = torch.empty(0)
        torch.mm(a, a, out=y)
        return y.sum()

    def resized():
        y = torch.empty(1)
        y.resize_(512, 512)
        return y.sum()

    assert traced_peak_bytes(lambda: torch.mm(a, a).sum()) == mib + 4
    assert traced_peak_bytes(into_out) == mib + 4
    assert traced_peak_bytes(resized) == mib + 4
    assert traced_peak_bytes(lambda: torch.tensor([1.0] * 262144)) >= mib
    assert traced_peak_bytes(lambda: a.view(-1)[:10].sum()) == 4  # views of an argument: nothing new
    # a storage made in fn and grown twice (out=, then resize_) counts once per growth, freed whole
    assert traced_peak_bytes(lambda: torch.mm(a, a, out=a.new_empty(0)).resize_(1024, 512).sum()) == 2 * mib + 4



def test_traced_peak_stands_in_for_meta_weights_on_the_trace_device():
    """materialize=[module]: a model built on meta (nothing loaded) is traced as on the CPU, its
    weights in use already (not counted) and back on meta afterwards, even after an error."""
    from mmfast.memory import traced_peak_bytes

    attention = torch.nn.MultiheadAttention(64, 4, batch_first=True, device="meta")
    x = torch.empty(1, 1024, 64)
    loaded = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    expected = traced_peak_bytes(lambda: loaded(x, x, x, need_weights=False)[0])
    assert traced_peak_bytes(lambda: attention(x, x, x, need_weights=False)[0], materialize=[attention]) == expected
    # traced on meta itself, SDPA takes its math path: the 4 x 1024 x 1024 scores (16 MiB) appear
    q = torch.empty(1, 4, 1024, 16, device="meta")
    on_meta = traced_peak_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), device="meta")
    assert on_meta >= 4 * 1024 * 1024 * 4 > 8 * expected
    with pytest.raises(RuntimeError):
        traced_peak_bytes(lambda: attention.out_proj(x[:, :, :3]), materialize=[attention])
    assert all(p.is_meta for p in attention.parameters())


SCRIPT = """
import torch, mmfast
from mmfast.memory import cpu_output_pool
from mmfast.ops import vq_dequantize
y = vq_dequantize(torch.zeros(2048, dtype=torch.long), torch.ones(1, 1024))
print(cpu_output_pool()["budget_mb"], y.sum().item())
"""


def run_with(setting: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=dict(os.environ, MMFAST_CPU_OUTPUT_POOL_MB=setting))


@pytest.mark.parametrize("setting, budget", [("", 512), ("0", 0), ("64", 64)])
def test_env_setting_sets_the_initial_budget(setting, budget):
    result = run_with(setting)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(budget), str(2048.0 * 1024)]


def test_bad_env_setting_is_a_value_error_naming_it():
    result = run_with("lots")
    assert result.returncode != 0
    assert "ValueError: MMFAST_CPU_OUTPUT_POOL_MB must be a whole number of MiB >= 0" in result.stderr, \
        result.stderr[-2000:]


def _poisoned_block(nbytes: int) -> int:
    """Frees an output of nbytes full of NaN into the pool; returns its address."""
    poison = vq_dequantize(torch.zeros(nbytes // 4096, dtype=torch.long), torch.full((1, 1024), float("nan")))
    assert poison.nbytes == nbytes and poison.isnan().all()
    address = poison.data_ptr()
    del poison
    return address


def test_every_op_writes_its_reused_block_whole(pool):
    """A block's old values must never show: each op that allocates through the pool gets a block
    full of NaN (the freed output of the same size) and must return what it returns on fresh
    memory. (Masked channels are written as zeros, not left as they were.)"""
    from mmfast.ops import linear_attention, masked_conv2d, masked_group_norm, masked_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 32, 32, generator=g)  # 1 MiB outputs
    w = torch.randn(2, 64, 64, 3, 3, generator=g)
    codes, mask = torch.tensor([1, 0, 0, 1]), torch.rand(2, 64, generator=g) < 0.5
    q, k, v = (torch.randn(1, 4096, 1, 64, generator=g) for _ in range(3))
    calls = {
        "masked_conv2d": lambda: masked_conv2d(x, w, None, codes, mask, mask, padding=1),
        "masked_linear": lambda: masked_linear(x.flatten(2).transpose(1, 2).contiguous(), w[..., 1, 1], None, codes,
                                               mask, mask),
        "masked_group_norm": lambda: masked_group_norm(x, None, None, 8, codes, mask),
        "linear_attention": lambda: linear_attention(q, k, v),
        "vq_dequantize": lambda: output(1),
    }
    for name, call in calls.items():
        cpu_output_pool(budget_mb=0)
        fresh = call()
        cpu_output_pool(budget_mb=512, clear=True)
        address = _poisoned_block(fresh.nbytes)
        reused = call()
        assert reused.data_ptr() == address, f"{name} did not get the poisoned block"
        torch.testing.assert_close(reused, fresh, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        del reused
