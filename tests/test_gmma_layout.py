"""The wgmma layouts (shared-memory tile, matrix descriptors, accumulators) that the sm_90a
kernels and the host emulator assume, checked against CuTe's on the host: a GPU-proven oracle
that does not share mmfast's reading of the PTX ISA (tests/cuda_emulator/gmma_layout_oracle.cpp)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cute_include_dir() -> Path | None:
    """CUTLASS's headers: $CUTLASS_INCLUDE_DIR, else the nvidia-cutlass wheel's (installed with
    --no-deps by `make venv`; found without importing the package)."""
    if os.environ.get("CUTLASS_INCLUDE_DIR"):
        return Path(os.environ["CUTLASS_INCLUDE_DIR"])
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return include if (include / "cute" / "tensor.hpp").is_file() else None


def cuda_include_dirs() -> list[Path] | None:
    spec = importlib.util.spec_from_file_location("_mmfast_setup_for_oracle", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    home = module.find_cuda_home()
    if home is None:
        return None
    include = Path(home) / "include"
    return [include] + ([include / "cccl"] if (include / "cccl").is_dir() else [])


def test_wgmma_layouts_match_cute(tmp_path):
    cute, cuda, compiler = cute_include_dir(), cuda_include_dirs(), shutil.which("g++") or shutil.which("c++")
    if cute is None:
        pytest.skip("CUTLASS headers not found: pip install --no-deps nvidia-cutlass, or set CUTLASS_INCLUDE_DIR")
    if cuda is None or compiler is None:
        pytest.skip("needs the CUDA toolkit's headers and a C++ compiler")
    exe = tmp_path / "gmma_layout_oracle"
    includes = [f"-I{d}" for d in [cute, ROOT / "tests" / "cuda_emulator", ROOT / "csrc" / "include", *cuda]]
    build = subprocess.run([compiler, "-std=c++20", "-O0", *includes, "-o", str(exe),
                            str(ROOT / "tests" / "cuda_emulator" / "gmma_layout_oracle.cpp")],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if "cast_smem_ptr_to_uint" not in line]
    assert run.returncode == 0 and lines[-1] == "passed: 0 mismatches", "\n".join(lines[-25:])
