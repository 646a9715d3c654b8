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
