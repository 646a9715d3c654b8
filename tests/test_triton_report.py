"""The Triton linear-attention and VQ-search kernels' launch configs: the autotune sweeps and their
fixed choice under the interpreter, scripts/triton_report.py (an offline sm_90 compile, no GPU)
and the committed reports the sweeps were chosen from."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from mmfast.triton import _common  # noqa: E402
from mmfast.triton import linear_attention as host  # noqa: E402
from mmfast.triton import pruned as pruned_host  # noqa: E402
from mmfast.triton import vq as vq_host  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "triton_report.py"
COMMITTED = ROOT / "benchmarks" / "results" / "2026-12-06-triton-sm90-linear-attention.json"
COMMITTED_VQ = ROOT / "benchmarks" / "results" / "2026-12-02-triton-sm90-vq.json"
TUNED = {
    "outer_sum_kernel": host._outer_sum_kernel,
    "apply_kernel": host._apply_kernel,
    "apply_backward_dq_kernel": host._apply_backward_dq_kernel,
    "state_backward_dk_kernel": host._state_backward_dk_kernel,
    "state_backward_dv_kernel": host._state_backward_dv_kernel,
}


_SPEC = importlib.util.spec_from_file_location("triton_report", SCRIPT)
report = importlib.util.module_from_spec(_SPEC)
sys.modules["triton_report"] = report  # dataclasses look their module up by name
_SPEC.loader.exec_module(report)  # triton is imported already: the interpreter stays as it is


def test_every_kernel_runs_its_fixed_config_under_the_interpreter():
    if not _common.INTERPRET:
        pytest.skip("on a GPU the sweeps are timed")
    assert _common.AUTOTUNE is False
    for name, tuned in TUNED.items():
        assert [(c.num_warps, c.num_stages) for c in tuned.configs] == [host.FIXED_LAUNCH], name
    assert [(c.num_warps, c.num_stages) for c in vq_host._search_kernel.configs] == [vq_host.FIXED_LAUNCH]
    assert [(c.num_warps, c.num_stages) for c in pruned_host._conv_kernel.configs] == [pruned_host.CONV_LAUNCH]


def test_autotune_keys_hold_no_sequence_length_or_resolution():
    """A new token count or resolution must not re-time a sweep: the keys name sizes that take a
    few values per model (head dims, channels, kernel size, a power-of-two pixel or row bucket)."""
    varying = {"N", "HO", "WO", "H", "W", "TOKENS", "PIX_TILES"}
    for name, tuned in {**TUNED, "vq search": vq_host._search_kernel, "masked conv": pruned_host._conv_kernel}.items():
        assert not varying & set(tuned.keys), (name, tuned.keys)
    assert "PIXELS_BUCKET" in pruned_host._conv_kernel.keys
    assert "N_BUCKET" in vq_host._search_kernel.keys


def test_sweeps_hold_the_fixed_config_and_autotune_over_them(monkeypatch):
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    for name, sweep in host.LAUNCH_SWEEPS.items():
        configs = _common.launch_configs(host.FIXED_LAUNCH, sweep)
        assert [(c.num_warps, c.num_stages) for c in configs] == sweep, name
        assert len(set(sweep)) == len(sweep) > 1, name
    assert set(host.LAUNCH_SWEEPS) == set(TUNED)
    configs = _common.launch_configs(vq_host.FIXED_LAUNCH, vq_host.LAUNCH_SWEEP)
    assert [(c.num_warps, c.num_stages) for c in configs] == vq_host.LAUNCH_SWEEP
    configs = _common.launch_configs(pruned_host.CONV_LAUNCH, pruned_host.CONV_SWEEP)
    assert [(c.num_warps, c.num_stages) for c in configs] == pruned_host.CONV_SWEEP
    with pytest.raises(ValueError, match=r"fixed launch config \(8, 2\) must be one of the sweep"):
        _common.launch_configs((8, 2), [(4, 2)])


def test_autotune_env_switch_turns_the_sweeps_off():
    code = ("import os; os.environ['TRITON_INTERPRET'] = '0'; os.environ['MMFAST_TRITON_AUTOTUNE'] = '0'\n"
            "from mmfast.triton import _common; print(_common.AUTOTUNE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_resource_usage_and_occupancy_helpers():
    text = (" Function apply_kernel:\n"
            "  REG:219 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:672 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert report.parse_resource_usage(text) == dict(registers=219, stack=0, static_smem=1024, local=0)
    with pytest.raises(ValueError, match="no resource usage"):
        report.parse_resource_usage("nothing")
    # Blocks per SM come from sass_report.occupancy (registers, shared memory, threads).
    def blocks_per_sm(registers, threads, smem):
        return report.sass_report.occupancy(registers, smem, threads).blocks_per_sm

    assert blocks_per_sm(158, 256, 33 * 1024) == 1  # 160 registers x 256 threads = 40 K of 64 K
    assert blocks_per_sm(255, 128, 33 * 1024) == 2
    assert blocks_per_sm(128, 512, 49 * 1024) == 1
    assert blocks_per_sm(32, 256, 100 * 1024) == 2  # shared memory bound (1 KB reserved per block)
    assert blocks_per_sm(32, 256, 228 * 1024) == 0  # over the 227 KB a block may have


def test_script_compiles_every_kernel_for_sm90(tmp_path):
    """The script end to end on the fixed config at D = 64, bf16: one row per kernel role (the VQ
    search's fixed config is the same; the masked conv ignores D)."""
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(SCRIPT), "--dims", "64", "--dtypes", "bf16", "--configs", "8:2",
                    "--json", str(out)], capture_output=True, text=True, check=True, cwd=ROOT, timeout=600)
    rows = json.loads(out.read_text())
    assert {r["role"] for r in rows} == {"state (S, m)", "apply", "apply_backward dq", "apply_backward dS, dm",
                                         "state_backward dk", "state_backward dv", "vq search", "masked conv"}
    for row in rows:
        assert 32 < row["registers"] <= 255 and row["spill_bytes"] == 0 and row["blocks_per_sm"] >= 1, row


def test_loops_of_the_masked_conv_kernel(tmp_path):
    """--loops: the conv kernel's loops, the innermost (one tap of one input block) holding its
    tensor-core products."""
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(SCRIPT), "--kernels", "pruned", "--dtypes", "bf16", "--configs", "4:2",
                    "--loops", "--json", str(out)], capture_output=True, text=True, check=True, cwd=ROOT, timeout=600)
    (row,) = json.loads(out.read_text())
    assert row["role"] == "masked conv" and row["d"] == 0 and row["loops"]
    innermost = max(row["loops"], key=lambda loop: loop["depth"])
    assert innermost["own"]["mma"] > 0 and innermost["own"]["global"] > 0


def test_committed_report_shows_no_spills_in_the_sweeps_at_d64():
    """The sweeps were chosen from the committed report: every config in them is there, and none
    spills at D = 64 in any dtype. (A kernel change that moves these needs the report rerun.)"""
    rows = json.loads(COMMITTED.read_text())
    by = {(r["kernel"], r["role"], r["d"], r["dtype"], r["num_warps"], r["num_stages"]): r for r in rows}
    roles = {(r["kernel"], r["role"]) for r in rows}
    assert {k for k, _ in roles} == set(host.LAUNCH_SWEEPS)
    for kernel, role in roles:
        for warps, stages in host.LAUNCH_SWEEPS[kernel]:
            for dtype in ("bf16", "fp16", "fp32"):
                row = by[(kernel, role, 64, dtype, warps, stages)]
                assert row["spill_bytes"] == 0 and row["blocks_per_sm"] >= 1, row


def test_committed_vq_report_shows_no_spills_in_the_sweep():
    """The VQ search's sweep holds no config that spills at D = 8 or 256 (LlamaGen's and
    Chameleon's code dims) in any dtype, by the committed report."""
    rows = json.loads(COMMITTED_VQ.read_text())
    by = {(r["d"], r["dtype"], r["num_warps"], r["num_stages"]): r for r in rows}
    assert {r["kernel"] for r in rows} == {"search_kernel"}
    for warps, stages in vq_host.LAUNCH_SWEEP:
        for d in (8, 256):
            for dtype in ("bf16", "fp16", "fp32"):
                row = by[(d, dtype, warps, stages)]
                assert row["spill_bytes"] == 0 and row["blocks_per_sm"] >= 1, row
