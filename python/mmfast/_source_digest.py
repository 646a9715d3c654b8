"""One digest of the sources the compiled extension is built from (csrc/ and setup.py), which
setup.py records at build time and `python -m mmfast` recomputes to tell a stale build. Kept
free of torch and of the rest of mmfast: setup.py loads this file before anything is built."""
from __future__ import annotations

import hashlib
import os

COMPILED_SOURCES = ("csrc", "setup.py")
SOURCE_SUFFIXES = (".cpp", ".cc", ".cu", ".h", ".hpp", ".cuh", ".inc")  # not editors' backups and swap files


def compiled_sources_digest(root: str) -> str:
    """sha256 over the relative paths and bytes of setup.py and every C++ / CUDA source under
    root/csrc, in sorted order (names and contents: a renamed or moved file changes it too)."""
    files = []
    for entry in COMPILED_SOURCES:
        path = os.path.join(root, entry)
        if os.path.isfile(path):
            files.append(entry)
        for folder, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            files += [os.path.relpath(os.path.join(folder, name), root) for name in names
                      if name.endswith(SOURCE_SUFFIXES)]
    digest = hashlib.sha256()
    for relative in sorted(files):
        digest.update(relative.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(root, relative), "rb") as f:
            digest.update(f.read())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
