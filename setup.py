"""Builds mmfast._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

    pip install --no-build-isolation -e .

Environment:
  CUDA_HOME / CUDA_PATH      CUDA toolkit root (else found from the nvcc on PATH)
  MMFAST_REQUIRE_CUDA=1      fail instead of building a CPU-only extension
  MMFAST_DISABLE_CUDA=1      build the CPU kernels only
  TORCH_CUDA_ARCH_LIST       default: the visible GPUs' archs; with no GPU visible "8.0+PTX;9.0a"
                             (A100, H100, and PTX that newer GPUs compile at load time)
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
    """The real toolkit root of the nvcc on PATH, which may be a wrapper script."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = Path(line.split("=", 1)[1].strip()).resolve()
            for candidate in (top, top.parent):
                if _is_toolkit(candidate):
                    return str(candidate)
    return None


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    return _toolkit_from_nvcc()


def _fail_or_warn(reason: str) -> bool:
    if os.environ.get("MMFAST_REQUIRE_CUDA") == "1":
        sys.exit(f"mmfast: MMFAST_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    print(f"mmfast: building the CPU kernels only ({reason})", file=sys.stderr)
    return False


def decide_cuda(cuda_home) -> bool:
    if os.environ.get("MMFAST_DISABLE_CUDA") == "1":
        return _fail_or_warn("MMFAST_DISABLE_CUDA=1")
    import torch

    if torch.version.cuda is None:
        return _fail_or_warn(f"torch {torch.__version__} is a CPU-only build")
    if cuda_home is None:
        return _fail_or_warn("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    return True


def default_archs() -> str:
    """The archs of the visible GPUs (9.x, 10.x, 12.x with their arch-specific 'a' features),
    else DEFAULT_ARCHS for a GPU-less builder such as CI."""
    import torch

    if not torch.cuda.is_available():
        return DEFAULT_ARCHS
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" + ("a" if major in (9, 10, 12) else "") for major, minor in capabilities)


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


def write_build_info(with_cuda: bool, archs: str) -> None:
    import torch

    info = {
        "source_commit": source_commit(),
        "source_digest": source_digest(),
        "compiler": compiler_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "cuda_archs": archs if with_cuda else None,
        "cuda_wgmma": has_sm90a_code(archs) if with_cuda else False,  # sm_90 GPUs may run the wgmma kernels
        "backends": ["cpu"] + (["cuda"] if with_cuda else []),
    }
    body = "".join(f"{key} = {value!r}\n" for key, value in info.items())
    (ROOT / "python" / "mmfast" / "_build_info.py").write_text('"""Written by setup.py at build time."""\n' + body)


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
    with_cuda = decide_cuda(cuda_home)
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_archs()) if with_cuda else ""

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
    write_build_info(with_cuda, archs)
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
    return [ext], {"build_ext": BuildExtension}


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
