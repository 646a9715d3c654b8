"""Probe (2026-12-02): the first write of a fresh CPU output of SD-2.1 masked-conv size, with
4 KiB pages (plain torch.empty) against the same block advised huge pages (madvise
MADV_HUGEPAGE on its 2 MiB-aligned interior, what mmfast's CPU outputs do, see
csrc/include/mmfast/cpu/memory.h), and a reused block for the floor. Medians of 11 calls.
Run: .venv/bin/python benchmarks/probes/fresh_output_pages.py"""
import ctypes
import pathlib
import statistics
import time

import torch

libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_HUGEPAGE, HUGE = 14, 2 << 20


def advised(t: torch.Tensor) -> torch.Tensor:
    begin = t.data_ptr()
    first, last = (begin + HUGE - 1) & ~(HUGE - 1), (begin + t.nbytes) & ~(HUGE - 1)
    if last > first:
        assert libc.madvise(first, last - first, MADV_HUGEPAGE) == 0, ctypes.get_errno()
    return t


def median_ms(fn, n=11):
    times = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
print("THP:", thp.read_text().strip() if thp.exists() else "n/a", "threads:", torch.get_num_threads())
for shape in [(8, 640, 48, 48), (8, 320, 64, 64), (8, 1280, 24, 24), (8, 1280, 12, 12)]:
    reused = torch.empty(shape)
    plain = median_ms(lambda: torch.empty(shape).fill_(1.0))
    huge = median_ms(lambda: advised(torch.empty(shape)).fill_(1.0))
    floor = median_ms(lambda: reused.fill_(1.0))
    print(f"{shape} {reused.nbytes / 1e6:.1f} MB: fresh {plain:.1f} ms, fresh advised {huge:.1f} ms, reused {floor:.1f} ms")
