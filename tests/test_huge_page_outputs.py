"""MMFAST_CPU_HUGE_PAGES: large CPU outputs advised transparent huge pages before their first
write (csrc/include/mmfast/cpu/memory.h, glue/common.h's empty_output), both where the output
pool maps them (the default) and with the pool off (MMFAST_CPU_OUTPUT_POOL_MB=0: torch's
allocator, then advised).

Each setting runs in a fresh process (the settings are read once). The advice must change no
value, and it must be visible where the kernel supports THP: the mapping that holds each output
carries the `hg` VmFlag in /proc/self/smaps with the default setting and not with 0.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

THP_SUPPORTED = sys.platform == "linux" and os.path.isdir("/sys/kernel/mm/transparent_hugepage")

# One output of each op that allocates through empty_output, every one of them 8 MiB (the
# smallest size advised): masked_conv2d, masked_linear, masked_group_norm, linear_attention's
# forward and its q/k/v gradients, vq_dequantize.
SCRIPT = """
import json
import torch, mmfast
from mmfast.ops import linear_attention, masked_conv2d, masked_group_norm, masked_linear, vq_dequantize


def advised(t):
    # VmFlags of the mapping holding the middle of t (inside the 2 MiB-aligned interior).
    address, inside = t.data_ptr() + t.nbytes // 2, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if not first.endswith(":"):
                low, high = (int(x, 16) for x in first.split("-"))
                inside = low <= address < high
            elif inside and first == "VmFlags:":
                return "hg" in line.split()[1:]
    return False


g = torch.Generator().manual_seed(0)
x = torch.randn(2, 64, 128, 128, generator=g)
w = torch.randn(2, 64, 64, 3, 3, generator=g)
codes, mask = torch.tensor([1, 0]), torch.rand(2, 64, generator=g) < 0.5
q, k, v = (torch.randn(1, 16384, 2, 64, generator=g, requires_grad=True) for _ in range(3))
attention = linear_attention(q, k, v)
attention.backward(torch.randn(attention.shape, generator=g))
outputs = {
    "masked_conv2d": masked_conv2d(x, w, None, codes, mask, mask, padding=1),
    "masked_linear": masked_linear(x.flatten(2).transpose(1, 2), w[..., 1, 1], None, codes, mask, mask),
    "masked_group_norm": masked_group_norm(x, None, None, 8, codes, mask),
    "linear_attention": attention, "grad_q": q.grad, "grad_k": k.grad, "grad_v": v.grad,
    "vq_dequantize": vq_dequantize(torch.randint(0, 512, (16384,), generator=g), torch.randn(512, 128, generator=g)),
}
assert all(t.nbytes == 8 << 20 for t in outputs.values()), {n: t.nbytes for n, t in outputs.items()}
print(json.dumps({n: [t.double().sum().item(), advised(t)] for n, t in outputs.items()}))
"""


@functools.lru_cache(maxsize=None)
def run(setting: str, pool: str = "") -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "THP_MEM_ALLOC_ENABLE"}  # torch's own advice
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=dict(env, MMFAST_CPU_HUGE_PAGES=setting, MMFAST_CPU_OUTPUT_POOL_MB=pool))


def outputs(setting: str, pool: str = "") -> dict:
    result = run(setting, pool)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pool", ["", "0"], ids=["pool", "no-pool"])
@pytest.mark.parametrize("setting", ["", "1"])
def test_default_and_1_advise_large_outputs_and_change_no_value(setting, pool):
    advised, plain = outputs(setting, pool), outputs("0", pool)
    for name, (total, flagged) in advised.items():
        assert total == plain[name][0], f"{name}: the advice changed the output"
        assert flagged == THP_SUPPORTED, f"{name}: hg VmFlag is {flagged}, THP supported: {THP_SUPPORTED}"


@pytest.mark.parametrize("pool", ["", "0"], ids=["pool", "no-pool"])
def test_0_advises_nothing(pool):
    flagged = [name for name, (_, hg) in outputs("0", pool).items() if hg]
    assert not flagged, f"MMFAST_CPU_HUGE_PAGES=0 still advised {flagged}"


def test_bad_setting_is_a_value_error_naming_it():
    result = run("yes")
    assert result.returncode != 0
    assert "ValueError: MMFAST_CPU_HUGE_PAGES must be 0 or 1, got 'yes'" in result.stderr, result.stderr[-2000:]
