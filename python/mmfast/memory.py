"""Peak memory: measured (CUDA allocator or CPU peak RSS) and predicted (fake execution).

    with PeakMemory(device) as meter:          # measured
        run()
    meter.peak_bytes                           # peak above what was in use on entry

    predicted = traced_peak_bytes(module, *args)   # same call on fake tensors: no memory, no FLOPs

    cpu_output_pool()                          # the blocks mmfast keeps for its large CPU outputs
    use_huge_pages(model)                      # CPU weights on transparent huge pages (decoding)

traced_peak_bytes runs the call under FakeTensorMode (real parameters are read as fakes, so
nothing is allocated or computed) and follows every tensor storage an operator creates until
it is freed; its result is the peak of the bytes held by those storages. It sees what PyTorch
allocates, not library workspaces (cuDNN, oneDNN) or allocator rounding, and the arguments
count as already in use.
"""
from __future__ import annotations

import math
import mmap
import operator
import os
import sys
import warnings
import weakref
from typing import Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .ops._checks import is_integer


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"PeakMemory: /proc/self/status has no {field}")


class PeakMemory:
    """Measures the peak memory of a block above the memory in use when it starts.

    CUDA: torch.cuda.max_memory_allocated (tensors only; the caching allocator's reserve and
    library workspaces are not counted). CPU: the process's peak resident set (VmHWM, reset via
    /proc/self/clear_refs), Linux only; elsewhere, and on other device types (meta, xpu, ...:
    not measured), `peak_bytes` is None. The CPU figure covers
    everything the process touches, so run nothing else in the process meanwhile, and it falls
    only when the allocator returns freed memory to the system: glibc keeps freed blocks below
    its (self-raising) mmap threshold, so for faithful numbers start the process with
    MALLOC_MMAP_THRESHOLD_=65536; likewise mmfast's pool of CPU output blocks keeps freed
    outputs resident (cpu_output_pool(budget_mb=0) turns it off). Linux updates the high-water
    mark lazily: memory handed back with madvise (glibc's per-thread arenas do) can hide a
    peak, so the CPU figure is a lower bound, clamped at 0 when the resident set at entry was
    never exceeded as far as the kernel recorded. Meters do not nest: entering one resets the peak that an enclosing one is
    measuring (both devices).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes: Optional[int] = None
        self.start_bytes = 0  # in use on entry (tensors on CUDA, resident set on CPU)
        self._cpu_unavailable = False

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu" and sys.platform.startswith("linux"):
            try:
                with open("/proc/self/clear_refs", "w") as clear_refs:
                    clear_refs.write("5")  # resets VmHWM to the current resident set
            except OSError:  # some sandboxes forbid it: no CPU measurement (peak_bytes stays None)
                self._cpu_unavailable = True
                return self
            self.start_bytes = _resident_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start_bytes
        elif self.device.type == "cpu" and sys.platform.startswith("linux") and not self._cpu_unavailable:
            self.peak_bytes = max(0, _resident_kib("VmHWM") * 1024 - self.start_bytes)


# Ops whose schema says their result aliases the input, though under FakeTensorMode it is a new
# storage: torch.tensor(...) inside the traced function arrives through them.
_LIFTS = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)


class _LiveStorageBytes(TorchDispatchMode):
    """Counts the bytes of storages that operators create, and their growth (resize_, an out=
    result resized), until each is freed."""

    def __init__(self, device=None):
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self.live = 0
        self.peak = 0
        self._tracked: dict = {}  # storage id -> finalizer (keeps one count per storage)
        self._counted: dict = {}  # storage id -> bytes counted in `live` for it
        self._seen: dict = {}  # storage id -> its size when last seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views alias an input and cannot grow it: skipped. In-place / out= results (written
        # aliases) may have grown their storage; the others are new storages.
        aliases = [ret.alias_info for ret in func._schema.returns if ret.alias_info is not None]
        creates = func in _LIFTS or not aliases
        if not creates and not any(alias.is_write for alias in aliases):
            return out
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and self._counts(tensor.device):
                self._track(tensor.untyped_storage(), creates)
        return out

    def _counts(self, device: torch.device) -> bool:
        if self.device is None:
            return True
        return device.type == self.device.type and (self.device.index is None or device.index == self.device.index)

    def _track(self, storage, created: bool) -> None:
        """Counts a created storage once, and any growth of one already counted."""
        key = id(storage)
        size = storage.nbytes()
        if key in self._tracked:
            grown = size - self._seen[key]
        elif created:  # tracked even when empty: torch.empty(0) as an out= target grows later
            self._tracked[key] = weakref.finalize(storage, self._release, key)
            self._seen[key], self._counted[key] = 0, 0
            grown = size
        else:  # an argument's storage (in use already): its growth by out= / resize_ is not seen
            return
        if grown <= 0:  # unchanged, or a smaller resize_, which keeps the storage's bytes
            return
        self._seen[key] = size
        self._counted[key] += grown
        self.live += grown
        self.peak = max(self.peak, self.live)

    def _release(self, key: int) -> None:
        self.live -= self._counted.pop(key, 0)
        self._seen.pop(key, None)
        self._tracked.pop(key, None)


def traced_peak_bytes(fn, *args, device=None, materialize: Sequence[torch.nn.Module] = (), **kwargs) -> int:
    """Predicted peak bytes of new tensors during fn(*args, **kwargs), without running it.

    Arguments may be real tensors (read as fakes: their memory counts as already in use) or
    tensors fn creates itself. Not counted: an argument's storage that fn grows in place
    (`out=` into it, `resize_`); tensors fn creates are counted as they grow. device: count only
    tensors on it (None: all). The result (and everything fn returns) is discarded.
    materialize: modules whose meta-device parameters and buffers (a model built under
    accelerate.init_empty_weights: nothing loaded) stand in during the trace as fake tensors on
    `device` (CPU when None), counted as in use like real ones. Operators pick their kernels by
    device: on meta, SDPA takes its math path, which holds the whole N x N score matrix.
    Raises whatever fn raises on fake tensors (e.g. a data-dependent .item()).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = _LiveStorageBytes(device)
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        holder = _MaterializedCall(materialize, fn, args, kwargs)
        stand_ins = holder.stand_ins(torch.device("cpu") if device is None else torch.device(device))
        with tracker:
            result = torch.func.functional_call(holder, stand_ins, (), strict=False, tie_weights=True)
            del result
    return tracker.peak


class _MaterializedCall(torch.nn.Module):
    """Holds the modules to materialize, so that functional_call swaps their meta tensors for
    fake stand-ins for the duration of fn (and restores them after, even on an error)."""

    def __init__(self, modules: Sequence[torch.nn.Module], fn, args, kwargs):
        super().__init__()
        self.held = torch.nn.ModuleList(modules)
        self._call = (fn, args, kwargs)

    def stand_ins(self, device: torch.device) -> dict:
        """Fake tensors (created under the caller's FakeTensorMode: no memory) for the meta ones."""
        tensors = dict(self.named_parameters())
        tensors.update(self.named_buffers())
        return {name: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
                for name, t in tensors.items() if t.is_meta}

    def forward(self):
        fn, args, kwargs = self._call
        return fn(*args, **kwargs)


def cpu_output_pool(budget_mb: Optional[int] = None, clear: bool = False) -> dict:
    """The pool of reused blocks behind mmfast's CPU outputs of 1 MiB and more (e.g.
    masked_conv2d's, linear_attention's; from 8 MiB advised huge pages): a freed output's block
    is kept for the next output of about its size (at most 1/8 larger), up to `budget_mb` MiB of idle blocks, the oldest
    released first, so an op called in a loop does not pay the kernel's page faults and zeroing
    for its whole output every call (glibc maps each block over 32 MiB anew: ~14 ms per 42 MB on
    the 2-core CI VM even with huge pages). torch.cuda's caching allocator keeps blocks the
    same way; this is its CPU counterpart for mmfast's own outputs only.

    Returns {"idle_blocks", "idle_bytes", "live_bytes" (blocks held by live outputs),
    "budget_mb"} as they were before this call; then sets the budget (budget_mb >= 0; 0 turns
    the pool off: outputs come from torch's allocator, advised huge pages) and, with clear=True,
    releases every idle block (as torch.cuda.empty_cache does). The budget starts at
    MMFAST_CPU_OUTPUT_POOL_MB (read once; default 512; anything but a whole number >= 0 is a
    ValueError from the first op that allocates). Idle blocks count as resident memory (RSS),
    which the kernel cannot reclaim under a container's memory limit. Where mmap is missing or
    fails, outputs come from torch's allocator (warned once). torch._lazy_clone (copy-on-write)
    does not accept pooled storages, as with torch's pinned-memory allocator.
    Raises ValueError for a negative budget, RuntimeError without the compiled extension.
    """
    from . import _extension

    if budget_mb is not None and (not is_integer(budget_mb) or not 0 <= budget_mb < 2**62):
        raise ValueError(f"cpu_output_pool: budget_mb must be an int in [0, 2**62) MiB (0 turns the pool off), "
                         f"got {budget_mb!r}")
    if not _extension.loaded():
        raise RuntimeError(f"cpu_output_pool: {_extension.describe_missing(torch.device('cpu'))}")
    blocks, idle, live, budget = torch.ops.mmfast.cpu_output_pool(-1 if budget_mb is None else operator.index(budget_mb),
                                                                  clear)
    return {"idle_blocks": blocks, "idle_bytes": idle, "live_bytes": live, "budget_mb": budget}


_THP_DIR = "/sys/kernel/mm/transparent_hugepage"


def _huge_page_bytes() -> int:
    """The kernel's transparent huge page size (2 MiB on x86-64; 32 MiB or 512 MiB on arm64
    kernels with 16K / 64K base pages), 2 MiB where the kernel does not say."""
    try:
        with open(os.path.join(_THP_DIR, "hpage_pmd_size")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


HUGE_PAGE_BYTES = _huge_page_bytes()
_warned_unsupported = False


def huge_pages_enabled() -> bool:
    """Whether mmfast advises transparent huge pages on the CPU: Linux with THP support
    (/sys/kernel/mm/transparent_hugepage), Python's mmap.madvise, and MMFAST_CPU_HUGE_PAGES
    unset, empty or "1" ("0" turns the advice off). The C++ output pool reads the same variable
    once per process; this reads it on every call. Raises ValueError for any other value."""
    mode = os.environ.get("MMFAST_CPU_HUGE_PAGES") or "1"
    if mode not in ("0", "1"):
        raise ValueError(f"MMFAST_CPU_HUGE_PAGES must be 0 or 1, got {mode!r}")
    return mode == "1" and _thp_supported()


def _thp_supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and os.path.isdir(_THP_DIR)


def huge_page_empty(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor whose memory starts on a huge-page boundary
    (HUGE_PAGE_BYTES, 2 MiB on x86-64), its whole huge pages advised to Linux's transparent
    huge pages (madvise(MADV_HUGEPAGE), before anything touches them), so that a stream over it
    takes one TLB entry per 2 MiB instead of per 4 KiB. The tail past the last whole huge page
    stays on normal pages, so no memory is resident beyond the tensor's own (rounded to 4 KiB).

    The memory is an anonymous mapping that the tensor's storage (exactly the tensor's bytes)
    keeps alive. Where the kernel refuses the advice, or THP is "never", the tensor is an
    ordinary one on 4 KiB pages. Raises RuntimeError where huge_pages_enabled() is false,
    ValueError for a negative shape.
    """
    if not huge_pages_enabled():
        raise RuntimeError("huge_page_empty: transparent huge pages need Linux with THP, mmap.MADV_HUGEPAGE and "
                           "MMFAST_CPU_HUGE_PAGES unset or 1")
    shape = tuple(shape)  # a generator would be spent by the check below
    if not all(is_integer(d) for d in shape):
        raise ValueError(f"huge_page_empty: shape must hold ints, got {tuple(shape)}")
    shape = tuple(operator.index(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"huge_page_empty: negative size in shape {shape}")
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    nbytes = numel * dtype.itemsize
    length = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    block = mmap.mmap(-1, length + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = torch.frombuffer(block, dtype=torch.uint8, count=1).data_ptr()
    offset = -address % HUGE_PAGE_BYTES  # a whole number of base pages: mappings start on one
    whole_huge_pages = nbytes // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if whole_huge_pages:
        try:
            block.madvise(mmap.MADV_HUGEPAGE, offset, whole_huge_pages)
        except OSError:  # a kernel or sandbox that refuses the advice: plain pages, as documented
            pass
    # The storage spans exactly the tensor (not the slack): torch.save and share_memory_ see its size.
    return torch.frombuffer(block, dtype=dtype, count=numel, offset=offset).view(shape)


def _advised_ranges():
    """[(start, end)] of this process's mappings that carry the hg VmFlag (advised huge pages,
    by mmfast, torch's THP_MEM_ALLOC_ENABLE or anything else)."""
    ranges, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if not first.endswith(":"):
                low, high = first.split("-")
                current = (int(low, 16), int(high, 16))
            elif first == "VmFlags:" and "hg" in line.split()[1:]:
                ranges.append(current)
    return ranges


def use_huge_pages(module: torch.nn.Module, min_bytes: int = HUGE_PAGE_BYTES) -> int:
    """Moves each CPU parameter of `module` holding at least `min_bytes` (one huge page) into
    memory from huge_page_empty (a copy; the Parameter objects stay, so tied weights stay tied
    and optimizers keep their references; the values are unchanged). Parameters already on
    advised memory, off the CPU, not contiguous or not plain strided tensors are left alone.
    Returns the bytes moved: 0 where huge_pages_enabled() is false (with one warning per
    process off Linux or without THP, unless MMFAST_CPU_HUGE_PAGES=0).

    Why: a decode step streams every weight once per token. On 4 KiB pages the 551 MB of a
    Llama-138M step cross 134,000 pages, each a TLB miss and a restart of the hardware
    prefetcher; on huge pages the step's 49 decode_linear calls read 4-19% faster on a 2-core
    AMD EPYC VM (a plain read gains 4-18% too:
    benchmarks/results/2026-12-05-cpu-amd-epyc-2core-avx512-liquid-step-huge-pages.md).
    LiquidLM.from_pretrained calls it for CPU models. Call it once after loading, before
    torch.compile, and not while another thread runs the module (the old storages are freed).
    Costs a copy of the moved bytes, and at most one partial huge page of resident memory per
    parameter under THP "always".
    """
    global _warned_unsupported
    if not huge_pages_enabled():
        if not _thp_supported() and not _warned_unsupported and os.environ.get("MMFAST_CPU_HUGE_PAGES") != "0":
            _warned_unsupported = True
            warnings.warn("use_huge_pages: no transparent huge pages here (Linux with THP only); weights stay on "
                          "normal pages")
        return 0
    advised = _advised_ranges()
    moved = 0
    with torch.inference_mode(False), torch.no_grad():  # normal tensors even when called under inference_mode
        for param in module.parameters():
            nbytes = param.numel() * param.element_size()
            if (param.device.type != "cpu" or nbytes < min_bytes or param.layout != torch.strided
                    or type(param.data) is not torch.Tensor or not param.is_contiguous()
                    or any(low <= param.data_ptr() < high for low, high in advised)):
                continue
            target = huge_page_empty(param.shape, param.dtype)
            target.copy_(param)
            param.data = target
            moved += nbytes
    return moved
