"""How the compiled extension is linked: facts that a test of the ops cannot see on this machine."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import mmfast._C


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="needs Linux and binutils' readelf")
def test_extension_uses_the_shared_libstdcxx():
    """_C must need libstdc++.so, the C++ runtime torch's own libraries use. Built by a g++ that
    links it statically (the H200 image's), _C carried a second copy, and every error it raised
    (TORCH_CHECK) ended the process with SIGSEGV instead of raising in Python."""
    dynamic = subprocess.run(["readelf", "-d", mmfast._C.__file__], capture_output=True, text=True,
                             check=True).stdout
    needed = [line.split("[")[-1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any(name.startswith("libstdc++.so") for name in needed), needed


def test_a_cpp_error_raises_the_python_exception_it_names():
    """A TORCH_CHECK_INDEX inside the extension arrives as IndexError, with mmfast's message."""
    with pytest.raises(IndexError, match="index 50 is out of range for a codebook of 50 codes"):
        torch.ops.mmfast.vq_dequantize(torch.tensor([1, 50]), torch.randn(50, 12), False)
