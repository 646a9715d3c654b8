"""MMFAST_CPU_HUGE_PAGES: large CPU outputs advised transparent huge pages before their first
write (csrc/include/mmfast/cpu/memory.h, glue/common.h's empty_output), both where the output
pool maps them (the default) and with the pool off (MMFAST_CPU_OUTPUT_POOL_MB=0: torch's
allocator, then advised); and weights moved onto huge pages (mmfast.memory.use_huge_pages,
which LiquidLM.from_pretrained applies on the CPU).

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

import numpy as np
import pytest

THP_SUPPORTED = sys.platform == "linux" and os.path.isdir("/sys/kernel/mm/transparent_hugepage")
# torch's own advice of every allocation of 2 MiB and more: weights are then advised already.
WEIGHTS_MOVABLE = THP_SUPPORTED and os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "0"

ADVISED = """
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
"""

# One output of each op that allocates through empty_output, every one of them 8 MiB (the
# smallest size advised): masked_conv2d, masked_linear, masked_group_norm, linear_attention's
# forward and its q/k/v gradients, vq_dequantize.
SCRIPT = """
import json
import torch, mmfast
from mmfast.ops import linear_attention, masked_conv2d, masked_group_norm, masked_linear, vq_dequantize


""" + ADVISED + """
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


# ---- weights: mmfast.memory.huge_page_empty / use_huge_pages (in this process) -------------------

def _advised_in_smaps(t) -> bool:
    namespace = {}
    exec(ADVISED, namespace)
    return namespace["advised"](t)


@pytest.mark.skipif(not THP_SUPPORTED, reason="transparent huge pages are Linux only")
def test_huge_page_empty_starts_on_a_huge_page_and_is_advised(monkeypatch):
    import torch
    from mmfast.memory import HUGE_PAGE_BYTES, huge_page_empty

    monkeypatch.delenv("MMFAST_CPU_HUGE_PAGES", raising=False)
    t = huge_page_empty((3, 1000, 999), torch.bfloat16)
    assert t.shape == (3, 1000, 999) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % HUGE_PAGE_BYTES == 0
    assert t.untyped_storage().nbytes() == t.nbytes  # the storage is the tensor, not the mapping's slack
    t.fill_(2)
    assert t.double().sum().item() == 2 * t.numel()
    assert _advised_in_smaps(t)
    assert huge_page_empty((0,)).numel() == 0
    assert huge_page_empty((np.int64(2), 3)).shape == (2, 3)
    assert huge_page_empty(d for d in (2, 3)).shape == (2, 3)  # a generator (the check once spent it)
    for bad in ((2.7, 3), (torch.tensor(2.5), 3)):  # a float size was truncated to 2
        with pytest.raises(ValueError, match="shape must hold ints"):
            huge_page_empty(bad)


def _tied_model(vocab=4096, hidden=768):
    import mmap

    import torch

    class Tied(torch.nn.Module):  # an LM's tied embedding and head (12 MiB) plus a small norm
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, hidden)
            self.head = torch.nn.Linear(hidden, vocab, bias=False)
            self.head.weight = self.embed.weight
            self.norm = torch.nn.LayerNorm(hidden)

    model = Tied()
    # The shared weight on a fresh anonymous mapping, never advised: malloc may hand out memory
    # inside a mapping something earlier in the process advised for huge pages, which
    # use_huge_pages rightly leaves alone (a CI run's xdist worker got 0 moved bytes).
    fresh = torch.frombuffer(mmap.mmap(-1, vocab * hidden * 4), dtype=torch.float32).view(vocab, hidden)
    fresh.copy_(model.embed.weight.detach())
    model.embed.weight.data = fresh
    return model


@pytest.mark.skipif(not WEIGHTS_MOVABLE, reason="Linux with THP, and THP_MEM_ALLOC_ENABLE off")
def test_use_huge_pages_moves_large_weights_keeping_values_parameters_and_ties(monkeypatch):
    import torch
    from mmfast.memory import HUGE_PAGE_BYTES, use_huge_pages

    monkeypatch.delenv("MMFAST_CPU_HUGE_PAGES", raising=False)
    model = _tied_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = dict(model.named_parameters())
    norm_ptr = model.norm.weight.data_ptr()
    assert use_huge_pages(model) == 4096 * 768 * 4  # the shared weight once; the norm is too small
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert model.head.weight is model.embed.weight
    assert model.embed.weight.data_ptr() % HUGE_PAGE_BYTES == 0 and _advised_in_smaps(model.embed.weight)
    assert model.norm.weight.data_ptr() == norm_ptr
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert model.embed.weight.requires_grad  # still trainable: the swap keeps the Parameter's flags
    assert use_huge_pages(model) == 0  # already on advised memory
    other = _tied_model()
    with torch.inference_mode():  # as a generate loop may call it: the weights must stay normal tensors
        assert use_huge_pages(other) > 0
    assert not other.embed.weight.is_inference()
    other.head(torch.randn(2, 768)).sum().backward()
    assert other.embed.weight.grad is not None


def test_use_huge_pages_off_with_0_and_bad_values_raise(monkeypatch):
    import torch
    from mmfast.memory import huge_page_empty, huge_pages_enabled, use_huge_pages

    model = _tied_model()
    pointer = model.embed.weight.data_ptr()
    monkeypatch.setenv("MMFAST_CPU_HUGE_PAGES", "0")
    assert not huge_pages_enabled()
    assert use_huge_pages(model) == 0 and model.embed.weight.data_ptr() == pointer
    with pytest.raises(RuntimeError, match="MMFAST_CPU_HUGE_PAGES"):
        huge_page_empty((4,), torch.float32)
    monkeypatch.setenv("MMFAST_CPU_HUGE_PAGES", "on")
    with pytest.raises(ValueError, match="MMFAST_CPU_HUGE_PAGES must be 0 or 1, got 'on'"):
        use_huge_pages(model)
