"""Before a GPU check spends device time: names every missing package, tool and device.

Exit status 1 when anything the check needs is missing (each one named), 0 otherwise.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys

# Module -> why gpu-check needs it (the CUDA image has torch, triton, pytest; the rest
# travel as wheels from `make gpu-wheels`).
MODULES = {
    "torch": "build and tests",
    "numpy": "tests",
    "pytest": "tests and benchmarks",
    "pytest_benchmark": "benchmarks",
    "safetensors": "LinFusion checkpoints",
    "triton": "the Triton backend",
    "diffusers": "LinFusion tests and benchmarks (make gpu-wheels)",
    "transformers": "tiny pipelines in the LinFusion tests",
    "hypothesis": "the fuzz tests (on the GPU image; skipped without it)",
    "matplotlib": "benchmark plot (optional)",
}
OPTIONAL = {"matplotlib", "hypothesis"}
# The op families' own tests skip what needs diffusers (test_decode.py imports transformers).
OP_FAMILIES = {"linear_attention", "vq", "decode", "pruned"}
if os.environ.get("GPU_CHECK_FAMILIES") and set(os.environ["GPU_CHECK_FAMILIES"].split()) <= OP_FAMILIES:
    OPTIONAL |= {"diffusers"}


def main() -> int:
    missing = []
    for module, why in MODULES.items():
        found = importlib.util.find_spec(module) is not None
        print(f"{'ok' if found else 'MISSING':>8}  python module {module:<18} ({why})")
        if not found and module not in OPTIONAL:
            missing.append(module)
    for tool, why in (("nvcc", "building the CUDA kernels"), ("ninja", "parallel build"),
                      ("compute-sanitizer", "sanitizer step (optional)")):
        found = shutil.which(tool) is not None
        print(f"{'ok' if found else 'MISSING':>8}  tool {tool:<27} ({why})")
        if not found and tool == "nvcc":
            missing.append(tool)
    if importlib.util.find_spec("torch") is not None:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        print(f"{'ok' if gpu else 'MISSING':>8}  GPU {gpu or 'none visible to torch'} (torch {torch.__version__}, "
              f"CUDA {torch.version.cuda})")
        if gpu is None:
            missing.append("a CUDA GPU")
    if missing:
        print(f"gpu-check preflight: missing {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
