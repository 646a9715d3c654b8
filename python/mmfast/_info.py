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
        "CUDA kernels": _ops_with_kernels("cuda", getattr(build, "cuda_skipped", None)),
        "CUDA archs": getattr(build, "cuda_archs", None),
        "CUDA wgmma kernels (sm_90a) compiled": getattr(build, "cuda_wgmma", None),
        "CUDA runtime": torch.version.cuda,
        "GPUs": gpu_facts(getattr(build, "cuda_archs", None)),
        "NVIDIA driver": nvidia_driver_version(),
        "Triton": _triton_version(),
        "packages": _package_versions(("numpy", "safetensors", "diffusers", "transformers", "tqdm")),
        "default backend": _backend.get_backend(),
        "MMFAST_* settings": {name: _setting(name, value) for name, value in sorted(os.environ.items())
                              if name.startswith("MMFAST_")},
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


def gpu_facts(cuda_archs) -> list | None:
    """One line per visible GPU: name, arch, memory and whether the build has code for it
    (:func:`arch_coverage`); None without a usable CUDA device."""
    if not torch.cuda.is_available():
        return None
    facts = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        facts.append(f"{index}: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                     f"mmfast kernels: {arch_coverage(cuda_archs, capability)}")
    return facts


def arch_coverage(cuda_archs, capability) -> str:
    """Which compiled code of a TORCH_CUDA_ARCH_LIST-style list ("8.0;9.0a;10.0f+PTX") a GPU of
    compute capability (major, minor) runs. Binary (SASS): of its own arch, or of an earlier
    minor of its major unless arch-specific ("a": that arch only; family "f" code runs on its
    major's later minors). PTX, compiled by the driver at first use (a slow start, no wgmma):
    of a plain arch <= its own, or of an "f" arch of its major. Names the rebuild when none."""
    major, minor = capability
    if not cuda_archs:
        return "none (a CPU-only build)"
    sass, ptx = [], []
    for entry in cuda_archs.replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        base = entry.split("+")[0]
        suffix = base[-1] if base[-1] in "af" else ""
        try:
            arch_major, arch_minor = (int(part) for part in base.rstrip("af").split("."))
        except ValueError:  # a named arch ("Hopper"): cpp_extension expands it, this report does not
            return f"unknown (the build's arch list {cuda_archs!r} names an arch)"
        exact = (arch_major, arch_minor) == (major, minor)
        same_major_earlier = arch_major == major and arch_minor < minor
        if exact or (suffix != "a" and same_major_earlier):
            sass.append(base)
        if entry.endswith("+PTX") and (
                (suffix == "" and (arch_major, arch_minor) <= (major, minor))
                or (suffix == "f" and (exact or same_major_earlier)) or (suffix == "a" and exact)):
            ptx.append(base)
    if sass:
        return f"binary for {', '.join(sass)}"
    if ptx:
        return f"PTX of {', '.join(ptx)}, compiled by the driver at first use"
    return (f"NONE for sm_{major}{minor} (built for {cuda_archs}): rebuild with "
            f"TORCH_CUDA_ARCH_LIST={major}.{minor}{'a' if major in (9, 10, 12) else ''}")


def nvidia_driver_version():
    """The NVIDIA kernel driver's version (Linux: /proc/driver/nvidia/version), else None."""
    import re

    try:
        with open("/proc/driver/nvidia/version") as f:
            match = re.search(r"Kernel Module(?: for \S+)?\s+([0-9][0-9.]*)", f.readline())
    except OSError:
        return None
    return match.group(1) if match else None


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


# The settings the compiled ops read lazily (a bad value raises ValueError from the first op that
# reads it, which may be much later): judged here as glue/common.h judges them.
_WHOLE_MIB = ("MMFAST_CPU_OUTPUT_POOL_MB", "MMFAST_PRUNED_WEIGHT_CACHE_MB")
_SWITCHES = ("MMFAST_CPU_HUGE_PAGES",)


def _setting(name: str, value: str) -> str:
    if name in _WHOLE_MIB and value != "" and not (value.isdigit() and value.isascii()):
        return f"{value!r} (ERROR: must be a whole number of MiB >= 0; ops reading it raise ValueError)"
    if name in _SWITCHES and value not in ("", "0", "1"):
        return f"{value!r} (ERROR: must be 0 or 1; ops reading it raise ValueError)"
    return value


def _cpu_fact(op: str):
    """The op's answer, or the error a bad MMFAST_CPU_* setting raises (reported, not a traceback)."""
    if not _extension.loaded():
        return None
    try:
        return getattr(torch.ops.mmfast, op)()
    except RuntimeError as error:
        return f"ERROR: {str(error).splitlines()[0]}"


def _ops_with_kernels(device_type: str, not_built_because=None) -> str:
    """'N ops (names)', else 'none' with the reason the build recorded for leaving them out."""
    ops = sorted(op for op, devices in _extension.COMPILED_KERNELS.items() if device_type in devices)
    if ops:
        return f"{len(ops)} ops ({', '.join(ops)})"
    return f"none (not built: {not_built_because})" if not_built_because else "none"


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
        if isinstance(value, list):  # the GPUs: one line each
            value = "\n".join([str(value[0])] + [f"{'':>24}{line}" for line in value[1:]]) if value else "none"
        print(f"{key:>22}: {value}")


if __name__ == "__main__":
    info()
