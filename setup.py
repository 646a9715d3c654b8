"""Builds mmfast._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

    pip install --no-build-isolation -e .

Environment:
  CUDA_HOME / CUDA_PATH      CUDA toolkit root (else found from the nvcc on PATH)
  MMFAST_REQUIRE_CUDA=1      fail instead of building a CPU-only extension
  MMFAST_DISABLE_CUDA=1      build the CPU kernels only
  TORCH_CUDA_ARCH_LIST       default: the visible GPUs' archs plus PTX of the newest plain one
                             (for GPUs newer than the builder's; an arch-specific "9.0a" newest
                             gets "8.0+PTX", as "a" PTX runs on that arch only); with no GPU
                             visible "8.0+PTX;9.0a" (A100, H100, and PTX that newer GPUs compile
                             at load time). Set but empty counts as unset.
  MAX_JOBS, NVCC_THREADS     build parallelism
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0+PTX;9.0a"


def _is_toolkit(path) -> bool:
    return bool(path) and (Path(path) / "include" / "cuda_runtime.h").is_file() and (Path(path) / "bin" / "nvcc").exists()


def _toolkit_from_nvcc():
    """The real toolkit root of the nvcc on PATH, which may be a wrapper script: the TOP its
    driver reports (or TOP's parent), else the folder above nvcc's bin/ (Debian / Ubuntu's
    nvidia-cuda-toolkit: /usr/bin/nvcc with /usr/include/cuda_runtime.h, TOP elsewhere)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    candidates = []
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("#$ TOP="):
                top = Path(line.split("=", 1)[1].strip()).resolve()
                candidates += [top, top.parent]
    except (OSError, subprocess.SubprocessError):
        pass
    candidates += [Path(nvcc).parent.parent, Path(nvcc).resolve().parent.parent]
    return next((str(candidate) for candidate in candidates if _is_toolkit(candidate)), None)


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    return _toolkit_from_nvcc()


def cuda_unavailable_reason(cuda_home):
    """Why the CUDA kernels cannot be built here, or None when they can. The build records it
    (_build_info.cuda_skipped), so that `python -m mmfast` and the error of an op called on a
    GPU say why: pip hides the build's own output unless it fails."""
    if os.environ.get("MMFAST_DISABLE_CUDA") == "1":
        return "MMFAST_DISABLE_CUDA=1"
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return None


def decide_cuda(reason) -> bool:
    """Whether to build the CUDA kernels, given cuda_unavailable_reason's answer: a reason stops
    the build under MMFAST_REQUIRE_CUDA=1, else it is printed and the CPU kernels are built."""
    if reason is None:
        return True
    if os.environ.get("MMFAST_REQUIRE_CUDA") == "1":
        sys.exit(f"mmfast: MMFAST_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    print(f"mmfast: building the CPU kernels only ({reason})", file=sys.stderr)
    return False


def archs_for_capabilities(capabilities) -> str:
    """A TORCH_CUDA_ARCH_LIST for GPUs of these compute capabilities: each one's arch (9.x, 10.x,
    12.x with their arch-specific 'a' features), plus PTX of the newest plain arch for GPUs newer
    than these. PTX of an 'a' arch runs on that arch alone, so where the newest is one, the PTX
    is 8.0's (as in DEFAULT_ARCHS; a plain 9.0 beside 9.0a would cost the wgmma kernels, see
    has_sm90a_code)."""
    capabilities = sorted(set(capabilities))
    archs = [f"{major}.{minor}" + ("a" if major in (9, 10, 12) else "") for major, minor in capabilities]
    if archs[-1].endswith("a"):
        if "8.0" in archs:
            archs[archs.index("8.0")] += "+PTX"
        else:
            archs.insert(0, "8.0+PTX")
    else:
        archs[-1] += "+PTX"
    return ";".join(archs)


def default_archs() -> str:
    """archs_for_capabilities of the visible GPUs, else DEFAULT_ARCHS for a GPU-less builder such as CI."""
    import torch

    if not torch.cuda.is_available():
        return DEFAULT_ARCHS
    return archs_for_capabilities(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))


def has_sm90a_code(archs: str) -> bool:
    """Whether an arch list gives sm_90 GPUs the sm_90a binary (wgmma kernels): it names 9.0a and
    not plain 9.0, whose binary the driver could pick instead. A named arch (torch's "Hopper" is
    9.0+PTX) could hide a plain 9.0: such lists get no wgmma kernels."""
    entries = {entry.split("+")[0].strip() for entry in archs.replace(" ", ";").split(";") if entry.strip()}
    numeric = all(entry[:1].isdigit() for entry in entries)
    return numeric and "9.0a" in entries and "9.0" not in entries


def nvidia_wheel_include_dirs():
    """cuBLAS/cuSPARSE headers shipped in torch's nvidia-* wheels (some ATen CUDA headers need them)."""
    dirs = []
    for entry in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            dirs += [d for d in glob.glob(os.path.join(entry, pattern)) if os.path.isfile(os.path.join(d, "cublas_v2.h"))]
    return sorted(set(dirs))


def _output_of(command, **kwargs):
    """stdout of a command, or None when it is missing, fails or times out (build info only:
    nothing here may stop a build)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=30, check=True,
                              **kwargs).stdout
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def source_commit():
    """The checkout's commit, '+dirty' when tracked files differ from it; None outside a git checkout
    of this tree (an sdist, also one unpacked inside another repository) or without git. Bug
    reports name it, and it tells a stale build from a fresh one."""
    top = _output_of(["git", "rev-parse", "--show-toplevel"], cwd=ROOT)
    if top is None or Path(top.strip()).resolve() != ROOT.resolve():
        return None
    commit = _output_of(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT)
    status = _output_of(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT)
    if commit is None or status is None:
        return None
    return commit.strip() + ("+dirty" if status.strip() else "")


def source_digest():
    """python/mmfast/_source_digest.py's digest of csrc/ and setup.py, loaded by path (the package
    itself imports torch and the extension being built)."""
    import importlib.util

    path = ROOT / "python" / "mmfast" / "_source_digest.py"
    spec = importlib.util.spec_from_file_location("_mmfast_source_digest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compiled_sources_digest(str(ROOT))


def compiler_version():
    """The first line of `$CXX --version` (cpp_extension compiles with $CXX, else c++; a CXX such
    as "ccache g++" is split into words), or None."""
    out = _output_of(shlex.split(os.environ.get("CXX", "c++")) + ["--version"])
    return out.splitlines()[0].strip() if out else None


def build_info(cuda_skipped, archs: str) -> dict:
    """What _build_info.py records: the build's sources, compiler, torch and CUDA archs.
    cuda_skipped: why the CUDA kernels were not built (None when they were)."""
    import torch

    with_cuda = cuda_skipped is None
    return {
        "source_commit": source_commit(),
        "source_digest": source_digest(),
        "compiler": compiler_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "cuda_archs": archs if with_cuda else None,
        "cuda_wgmma": has_sm90a_code(archs) if with_cuda else False,  # sm_90 GPUs may run the wgmma kernels
        "cuda_skipped": cuda_skipped,
        "backends": ["cpu"] + (["cuda"] if with_cuda else []),
    }


def write_build_info(path, info: dict) -> None:
    body = "".join(f"{key} = {value!r}\n" for key, value in info.items())
    Path(path).write_text('"""Written by setup.py after a successful build of the _C beside it."""\n' + body)


def recording_build_ext(base, info: dict):
    """base (cpp_extension's BuildExtension) writing _build_info.py beside each built extension
    (in place: python/mmfast/; else the build's lib folder, whose copy the wheel ships) once the
    build has succeeded. Written before, a failed or aborted build (or `setup.py --help`) left a
    record of an extension that was never built beside the old one, and `python -m mmfast`
    called the old kernels current."""

    class BuildExtensionRecordingInfo(base):
        def run(self):
            super().run()
            for ext in self.extensions:
                write_build_info(Path(self.get_ext_fullpath(ext.name)).parent / "_build_info.py", info)

    return BuildExtensionRecordingInfo


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
    cuda_skipped = cuda_unavailable_reason(cuda_home)
    with_cuda = decide_cuda(cuda_skipped)
    archs = ""
    if with_cuda:  # an empty TORCH_CUDA_ARCH_LIST (`export TORCH_CUDA_ARCH_LIST=`) counts as unset
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or default_archs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # Every source under csrc/: a new op family adds files, not lines here.
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    # -fopenmp: at::parallel_for is an inline template whose OpenMP pragma is compiled in
    # our TU; without the flag the CPU kernels silently run on one thread.
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    extra = {"cxx": cxx_flags}
    include_dirs = [str(ROOT / "csrc" / "include"), str(ROOT / "csrc")]
    if with_cuda:
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        include_dirs += nvidia_wheel_include_dirs()
        extra["nvcc"] = ["-O3", "-lineinfo", "--threads", os.environ.get("NVCC_THREADS", "2")]
        if has_sm90a_code(archs):  # the launchers may pick the wgmma kernels on sm_90 devices
            extra["nvcc"].append("-DMMFAST_SM90A_BUILD")
        extension = CUDAExtension
    else:
        extension = CppExtension
    info = build_info(cuda_skipped, archs)
    # The shared libstdc++ by its file name (-l:libstdc++.so.6), ahead of the driver's own
    # libraries: the one torch uses, even where g++ links it statically. The H200 image's
    # own GCC 13.3 install does, and its library folder holds only libstdc++.a, so a plain -lstdc++ found
    # the archive there too (the second H200 run; reproduced here with such a folder and
    # -static-libstdc++). With a second, static copy in _C, every C++ error mmfast raised
    # (TORCH_CHECK) ended the process with SIGSEGV instead of raising in Python
    # (benchmarks/results/2026-12-04-h200-gpu-check.md).
    link_args = ["-fopenmp"] + (["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else [])
    ext = extension("mmfast._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                    extra_link_args=link_args)
    return [ext], {"build_ext": recording_build_ext(BuildExtension, info)}


# pip (setuptools.build_meta) and `python setup.py` both run this file as __main__; the guard lets
# scripts/sass_report.py import the toolkit lookup above without building anything.
if __name__ == "__main__":
    ext_modules, cmdclass = extensions()

    setup(
        name="mmfast",
        version="0.1.0",
        description="Compiled CPU/CUDA/Triton kernels for LinFusion, APTP, Liquid and DiffDIS",
        package_dir={"": "python"},
        packages=find_packages("python"),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        python_requires=">=3.9",
    )
