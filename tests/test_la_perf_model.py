"""scripts/la_perf_model.py: the plan it models matches issue 14's worked numbers, the design
ceiling is at or above the floor, more loads in flight never predicts slower. No GPU, no compiler."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "la_perf_model.py"
_SPEC = importlib.util.spec_from_file_location("la_perf_model", _PATH)
model = importlib.util.module_from_spec(_SPEC)
sys.modules["la_perf_model"] = model
_SPEC.loader.exec_module(model)


def test_state_plan_matches_issue_14_worked_example():
    # "52 chunks x 10 x 4160 fp32 = 8.7 MB" at B*H = 10, N = 16384, D = 64 on 132 SMs
    chunk, nchunks = model.state_plan(10, 16384, 64, 64)
    assert nchunks == 52 and chunk % model.BK == 0 and chunk * nchunks >= 16384 > chunk * (nchunks - 1)
    passes = model.forward_passes(10, 16384, 64)
    assert [p.kernel for p in passes] == ["la_state_kernel", "la_state_reduce_kernel", "la_apply_kernel"]
    partials = 10 * 52 * (64 * 64 + 64) * 4
    assert abs(passes[1].bytes - (partials + 10 * (64 * 64 + 64) * 4)) < 1


def test_single_chunk_has_no_reduce_launch():
    # enough heads that every SM has a tile without splitting N
    assert [p.kernel for p in model.forward_passes(4096, 256, 64)] == ["la_state_kernel", "la_apply_kernel"]


def test_ceilings_are_ordered():
    for _, b, n, h, d in model.SHAPES:
        passes = model.forward_passes(b * h, n, d)
        design = sum(max(p.bytes / model.COPY_BW, p.flops / model.TF32_FLOPS) for p in passes)
        assert design >= model.floor_seconds(b * h, n, d) * 0.999
        for p in passes:
            threads = model.resident_threads(p.kernel, None)
            staged = model.latency_bound_seconds(p, threads, 2, 700e-9)
            one_load = model.latency_bound_seconds(p, threads, 2, 700e-9, one_load=True)
            assert 0 < staged <= one_load  # more loads in flight never predicts slower
    assert "large-N256K forward" in model.table(None, 700.0)


def test_padded_tiles_count_the_mma_work_issued():
    # D = 40 runs 64-wide tiles: (64 / 40)^2 = 2.56x the useful products
    state = model.forward_passes(16, 16384, 40)[0]
    assert abs(state.flops / (2 * 16 * 16384 * 40 * 40) - 2.56) < 1e-9
