"""setup.py's build decisions, tested without building (its setup() call is guarded by __main__)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("_mmfast_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "archs, expected",
    [
        ("8.0+PTX;9.0a", True),  # the GPU-less default
        ("9.0a", True),  # built on an H100 / H200
        ("9.0a 8.6", True),  # space-separated lists, as torch accepts
        ("9.0", False),  # no sm_90a binary: wgmma does not exist there
        ("9.0;9.0a", False),  # two sm_90 binaries: the driver might load the one without wgmma
        ("9.0+PTX;9.0a", False),
        ("8.0;8.6", False),
        ("10.0a;12.0a", False),
        ("Hopper;9.0a", False),  # torch's named arch: Hopper is 9.0+PTX
        ("Ampere 9.0a", False),
        ("", False),
    ],
)
def test_the_wgmma_kernels_are_enabled_only_for_an_unambiguous_sm_90a_binary(setup_module, archs, expected):
    assert setup_module.has_sm90a_code(archs) is expected


def test_build_info_commit_and_compiler_never_stop_a_build(setup_module, tmp_path, monkeypatch):
    """The commit is this checkout's (12 hex digits, '+dirty' for local changes) and None for a
    tree that is not this checkout's top (an sdist, even inside another repository); a missing
    or failing compiler gives None, a CXX of several words is run as words."""
    import re
    import shutil

    commit = setup_module.source_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", commit), commit
    monkeypatch.setattr(setup_module, "ROOT", tmp_path / "unpacked-sdist")
    (tmp_path / "unpacked-sdist").mkdir()
    assert setup_module.source_commit() is None
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert setup_module.compiler_version() is None
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler:
        monkeypatch.setenv("CXX", f"env {compiler}")  # a wrapper word first, as "ccache g++"
        assert setup_module.compiler_version()


def test_source_digest_follows_the_compiled_sources_only(tmp_path):
    """The digest setup.py records (python -m mmfast compares it, to tell a stale build) changes
    with any C++ / CUDA source under csrc/ or setup.py, by content or name, and with nothing else."""
    import importlib.util

    path = ROOT / "python" / "mmfast" / "_source_digest.py"
    spec = importlib.util.spec_from_file_location("_digest_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    digest = module.compiled_sources_digest
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "setup.py").write_text("setup()\n")
    kernel = tmp_path / "csrc" / "cpu" / "kernel.cpp"
    kernel.write_text("int f() { return 1; }\n")
    first = digest(str(tmp_path))
    (tmp_path / "csrc" / "cpu" / ".kernel.cpp.swp").write_text("editor state")
    (tmp_path / "README.md").write_text("docs")
    assert digest(str(tmp_path)) == first
    kernel.write_text("int f() { return 2; }\n")
    second = digest(str(tmp_path))
    assert second != first
    kernel.rename(tmp_path / "csrc" / "cpu" / "renamed.cpp")
    assert digest(str(tmp_path)) not in (first, second)
    assert len(digest(str(ROOT))) == 16


def test_make_venv_space_check_warns_and_never_fails(tmp_path):
    """scripts/check_free_space.sh (run before `make venv`): one warning per file system when
    less than NEEDED_GB is free (a CI run once stopped on 'No space left on device'), silence
    when enough is, and exit 0 whatever it is given; --df shows the file systems."""
    import subprocess

    script = str(ROOT / "scripts" / "check_free_space.sh")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    run = lambda *args: subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env)
    short = run(str(tmp_path / "not-yet" / ".venv"), "999999")
    assert short.returncode == 0 and short.stderr.count("warning: ") == 1, short.stderr  # one file system
    assert "needs about 999999 GB" in short.stderr and "No space left on device" in short.stderr
    enough = run(str(tmp_path / ".venv"), "0")
    assert enough.returncode == 0 and enough.stderr == ""
    for bad in ("7.5", "lots"):
        odd = run(str(tmp_path / ".venv"), bad)
        assert odd.returncode == 0 and "whole number of GB" in odd.stderr
    shown = run("--df", str(tmp_path / ".venv"))
    assert shown.returncode == 0 and shown.stdout.startswith("Filesystem")


@pytest.mark.parametrize(
    "capabilities, expected",
    [
        ([(8, 0)], "8.0+PTX"),
        ([(8, 6)], "8.6+PTX"),  # torch's own default adds compute_86 PTX too
        ([(7, 5), (8, 6)], "7.5;8.6+PTX"),
        ([(9, 0)], "8.0+PTX;9.0a"),  # 9.0a PTX runs on sm_90 only: newer GPUs take 8.0's
        ([(8, 0), (9, 0), (9, 0)], "8.0+PTX;9.0a"),
        ([(8, 6), (9, 0)], "8.0+PTX;8.6;9.0a"),
        ([(10, 0), (12, 0)], "8.0+PTX;10.0a;12.0a"),
    ],
)
def test_the_visible_gpus_arch_list_carries_ptx_for_newer_gpus(setup_module, capabilities, expected):
    """Issue 14: the default arch list from the visible GPUs, with PTX of the newest plain arch;
    every visible GPU gets a binary of its own and an H100 still gets the wgmma kernels."""
    from mmfast._info import arch_coverage

    archs = setup_module.archs_for_capabilities(capabilities)
    assert archs == expected
    for capability in capabilities:
        assert arch_coverage(archs, capability).startswith("binary for"), (capability, archs)
    assert "PTX" in arch_coverage(archs, (13, 0)) or "binary" in arch_coverage(archs, (13, 0))
    assert setup_module.has_sm90a_code(archs) is ((9, 0) in capabilities)


def test_an_empty_arch_list_counts_as_unset(setup_module, monkeypatch):
    """`export TORCH_CUDA_ARCH_LIST=` (an empty Docker ARG) made torch's arch flags raise
    IndexError with no GPU and recorded '' (a "CPU-only build") with one."""
    import os

    import torch

    if setup_module.cuda_unavailable_reason(setup_module.find_cuda_home()) is not None:
        pytest.skip("this machine builds no CUDA kernels")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", ""))  # restored after: extensions() sets it
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", " ")
    monkeypatch.delenv("MMFAST_DISABLE_CUDA", raising=False)
    setup_module.extensions()
    expected = setup_module.DEFAULT_ARCHS if not torch.cuda.is_available() else setup_module.default_archs()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == expected


def test_a_debian_style_toolkit_is_found_from_the_nvcc_on_path(setup_module, tmp_path, monkeypatch):
    """Debian / Ubuntu's nvidia-cuda-toolkit: /usr/bin/nvcc (a wrapper) and /usr/include, with the
    driver's TOP elsewhere: the folder above nvcc's bin/ is the toolkit (it gave a silent CPU-only
    build)."""
    usr = tmp_path / "usr"
    (usr / "bin").mkdir(parents=True)
    (usr / "include").mkdir()
    (usr / "include" / "cuda_runtime.h").write_text("")
    nvcc = usr / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={usr}/lib/nvidia-cuda-toolkit'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{usr / 'bin'}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert setup_module.find_cuda_home() == str(usr)


def test_build_info_is_written_beside_the_extension_only_after_a_successful_build(setup_module, tmp_path):
    """Written at setup time, a failed build (or `setup.py --help`) left the record of an extension
    never built beside the old one, and `python -m mmfast` called the old kernels current."""
    import runpy
    import types

    class FakeBuildExtension:
        extensions = [types.SimpleNamespace(name="mmfast._C")]

        def __init__(self, fail):
            self.fail = fail

        def run(self):
            if self.fail:
                raise RuntimeError("compile error")

        def get_ext_fullpath(self, name):
            return str(tmp_path / "lib" / "mmfast" / "_C.so")

    (tmp_path / "lib" / "mmfast").mkdir(parents=True)
    info = setup_module.build_info("MMFAST_DISABLE_CUDA=1", "")
    command = setup_module.recording_build_ext(FakeBuildExtension, info)
    with pytest.raises(RuntimeError, match="compile error"):
        command(fail=True).run()
    written = tmp_path / "lib" / "mmfast" / "_build_info.py"
    assert not written.exists()
    command(fail=False).run()
    recorded = runpy.run_path(str(written))
    assert {key: recorded[key] for key in info} == info
    assert recorded["cuda_skipped"] == "MMFAST_DISABLE_CUDA=1" and recorded["backends"] == ["cpu"]


def test_the_sdist_carries_every_source_the_build_compiles(tmp_path):
    """The sdist (and so `python -m build`'s wheel) had the .cpp / .cu files setup.py names but no
    header, and a CPU-only machine's sdist no .cu file: MANIFEST.in ships csrc/ whole, never a
    machine's _build_info.py."""
    import os
    import shutil
    import subprocess
    import sys
    import tarfile

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    copy = tmp_path / "mmfast"
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    (copy / "python" / "mmfast" / "_build_info.py").write_text("stale = True\n")
    # CPU-only (no .cu passed to setuptools), whatever CI's MMFAST_REQUIRE_CUDA=1 says
    env = {**{k: v for k, v in os.environ.items() if k != "MMFAST_REQUIRE_CUDA"}, "MMFAST_DISABLE_CUDA": "1"}
    built = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=copy,
                           env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (archive,) = (tmp_path / "dist").glob("mmfast-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = {name for name in filter(None, tracked.decode().split("\0"))
               if name.startswith("csrc/") and name.endswith((".h", ".cuh", ".cpp", ".cu"))}
    assert sources and sources <= names, sorted(sources - names)[:5]
    assert "python/mmfast/_build_info.py" not in names
    assert "python/mmfast/_source_digest.py" in names


def test_the_test_extra_holds_what_the_tests_import():
    """pyproject's `test` extra against requirements-test.txt (what CI installs): `pip install
    .[test]` lacked accelerate, which tests/test_linfusion_highres.py imports."""
    import re

    extras = (ROOT / "pyproject.toml").read_text()
    test_extra = set(re.findall(r'"([A-Za-z0-9_.-]+)', re.search(r"^test = \[(.*)\]$", extras, re.M).group(1)))
    dependencies = set(re.findall(r'"([A-Za-z0-9_.-]+)', re.search(r"^dependencies = \[(.*)\]$", extras, re.M).group(1)))
    build_tools = {"ninja", "setuptools", "wheel"}
    required = {re.split(r"[<>=\s]", line)[0] for line in (ROOT / "requirements-test.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert required - build_tools - dependencies <= test_extra, sorted(required - build_tools - dependencies - test_extra)
    assert test_extra <= required, sorted(test_extra - required)  # both ways: scipy was in the extra only


def test_the_missing_kernel_errors_say_why_and_name_both_torch_versions(monkeypatch):
    """The error of an op without kernels names the build's recorded reason (pip hides the build's
    own output) and, after a build against another torch, both versions."""
    import types

    import torch

    from mmfast import _extension

    monkeypatch.setattr(_extension, "build_info", types.SimpleNamespace(
        cuda_skipped="no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)", torch_version=torch.__version__))
    message = _extension.describe_missing(torch.device("cuda"))
    assert "no CUDA toolkit found" in message and "built against" not in message
    monkeypatch.setattr(_extension, "build_info", types.SimpleNamespace(cuda_skipped=None, torch_version="2.0.0"))
    monkeypatch.setattr(_extension, "IMPORT_ERROR", ImportError("undefined symbol: _ZN3c10"))
    message = _extension.describe_missing(torch.device("cpu"))
    assert "undefined symbol" in message and "built against torch 2.0.0" in message
    assert f"this is torch {torch.__version__}" in message and "--no-build-isolation" in message
