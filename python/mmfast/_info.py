"""`python -m mmfast` or `mmfast.info()`: what this installation of mmfast can run."""
from __future__ import annotations

import importlib.util
import os
import platform

import torch

from . import _extension


def collect() -> dict:
    from . import __version__, _backend

    build = _extension.build_info
    facts = {
        "mmfast": __version__,
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "extension": "loaded" if _extension.loaded() else f"NOT LOADED ({_extension.IMPORT_ERROR})",
        "built against torch": getattr(build, "torch_version", "unknown"),
        # None: built outside a git checkout of mmfast, or before builds recorded it
        "built from commit": getattr(build, "source_commit", None),
        "build vs sources": build_freshness(build),
        "built with": getattr(build, "compiler", None),
        "OS": platform.platform(),
        "CPU kernels": _ops_with_kernels("cpu"),
        "CPU": cpu_model(),
        "CPU threads (torch)": torch.get_num_threads(),
        "CPU ISA": _cpu_fact("cpu_isa"),
        "CPU AMX-BF16 (bf16 vq_quantize)": _cpu_fact("cpu_amx_bf16"),
        "CPU AVX512-BF16 (bf16 vq_quantize)": _cpu_fact("cpu_avx512_bf16"),
        "CUDA kernels": _ops_with_kernels("cuda"),
        "CUDA archs": getattr(build, "cuda_archs", None),
        "CUDA wgmma kernels (sm_90a) compiled": getattr(build, "cuda_wgmma", None),
        "CUDA runtime": torch.version.cuda,
        "GPU": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "Triton": _triton_version(),
        "packages": _package_versions(("numpy", "safetensors", "diffusers", "transformers", "tqdm")),
        "default backend": _backend.get_backend(),
        "MMFAST_* settings": {name: value for name, value in sorted(os.environ.items()) if name.startswith("MMFAST_")},
    }
    return facts


def build_freshness(build) -> str:
    """Whether the compiled sources (csrc/, setup.py) of the checkout this package sits in still
    hash to the digest recorded when the extension was built: after a pull or an edit without
    a rebuild, the old kernels run. Not a source checkout, or a build that recorded none: says so."""
    from ._source_digest import compiled_sources_digest

    recorded = getattr(build, "source_digest", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python/mmfast/ -> root
    if recorded is None or not os.path.isdir(os.path.join(root, "csrc")):
        return "unknown (not a source checkout, or a build before digests were recorded)"
    if compiled_sources_digest(root) != recorded:
        return "STALE: csrc/ or setup.py changed since the build; rebuild (pip install -e . or make build)"
    return "current"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_fact(op: str):
    """The op's answer, or the error a bad MMFAST_CPU_* setting raises (reported, not a traceback)."""
    if not _extension.loaded():
        return None
    try:
        return getattr(torch.ops.mmfast, op)()
    except RuntimeError as error:
        return f"ERROR: {str(error).splitlines()[0]}"


def _ops_with_kernels(device_type: str) -> str:
    ops = sorted(op for op, devices in _extension.COMPILED_KERNELS.items() if device_type in devices)
    return f"{len(ops)} ops ({', '.join(ops)})" if ops else "none"


def _package_versions(names) -> dict:
    """{name: installed version or None}, read from the package metadata (nothing is imported)."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _triton_version():
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def info() -> None:
    """Prints version, torch version, compiled backends and archs."""
    for key, value in collect().items():
        print(f"{key:>22}: {value}")


if __name__ == "__main__":
    info()
