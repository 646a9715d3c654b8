"""How the compiled extension is linked: facts that a test of the ops cannot see on this machine."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

_C = pytest.importorskip("mmfast._C", reason="the extension is not built")
LINUX = sys.platform.startswith("linux")


def _binutils(tool, *args):
    return subprocess.run([tool, *args, _C.__file__], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not LINUX or shutil.which("readelf") is None, reason="needs Linux and binutils' readelf")
def test_extension_uses_the_shared_libstdcxx():
    """_C must need libstdc++.so, the C++ runtime torch's own libraries use. Built by a g++ that
    links it statically (the H200 image's), _C carried a second copy, and the errors it raised
    (TORCH_CHECK) ended the process with SIGSEGV instead of raising in Python."""
    needed = [line.split("[")[-1].rstrip("]") for line in _binutils("readelf", "-d").splitlines()
              if "(NEEDED)" in line]
    assert any(name.startswith("libstdc++.so") for name in needed), needed


@pytest.mark.skipif(not LINUX or shutil.which("nm") is None, reason="needs Linux and binutils' nm")
def test_extension_defines_no_cxx_runtime_of_its_own():
    """Not even part of a static copy: the exception machinery must be the shared runtime's."""
    defined = {line.split()[-1] for line in _binutils("nm", "-D", "--defined-only").splitlines() if line.strip()}
    assert not defined & {"__cxa_throw", "__cxa_begin_catch", "__gxx_personality_v0"}


def test_a_cpp_error_raises_the_python_exception_it_names():
    """A TORCH_CHECK_INDEX inside the extension arrives as IndexError with mmfast's message, in a
    child process so that a crash shows as this test's failure, not as a lost pytest worker."""
    code = textwrap.dedent("""
        import torch, mmfast
        try:
            torch.ops.mmfast.vq_dequantize(torch.tensor([1, 50]), torch.randn(50, 12), False)
        except IndexError as error:
            print(error)
    """)
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"exit status {child.returncode}:\n{child.stderr[-2000:]}"
    assert "index 50 is out of range for a codebook of 50 codes" in child.stdout
