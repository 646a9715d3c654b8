"""The arguments every example shares (--device, --backend, --output) and the checks that turn
a user's ordinary mistake (no GPU, a folder that does not exist, an output path of the wrong
kind) into one argparse error line, exit status 2, before any work starts, instead of a
traceback after it. Used by examples/*.py; nothing here is needed to use the ops or models.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch

from ._backend import BACKENDS

__all__ = ["add_device_arguments", "add_output_argument", "check_device", "check_output", "require_local_dir",
           "require_file", "require_positive"]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_arguments(parser: argparse.ArgumentParser, *, default: Optional[str] = None) -> None:
    """--device (default cuda when a GPU is visible, else cpu, unless `default`) and --backend."""
    default = default or _default_device()
    parser.add_argument("--device", default=default, help=f"torch device, e.g. cpu, cuda, cuda:1 (default {default})")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="mmfast backend of the ops (default auto: the compiled kernels of the device)")


def add_output_argument(parser: argparse.ArgumentParser, default: Optional[str], *, kind: str,
                        what: str) -> None:
    """--output (alias --out): a folder (kind "folder") or an image file (kind "image")."""
    metavar = "DIR" if kind == "folder" else "FILE"
    where = f" (default ./{default})" if default else ""
    parser.add_argument("--output", "--out", default=default, metavar=metavar, help=f"{what}{where}")


def check_device(parser: argparse.ArgumentParser, device: str) -> torch.device:
    """The torch.device of --device; an argparse error for a malformed name or a GPU not present."""
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        parser.error(f"--device {device!r}: {error}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__} here "
                         f"(CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            parser.error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return parsed


def check_output(parser: argparse.ArgumentParser, path: Optional[str], *, kind: str) -> None:
    """Makes --output usable before the run: a folder is created (an existing file is an error);
    an image file needs an extension Pillow can write and its folder is created (an existing
    folder is an error)."""
    if path is None:
        return
    if kind == "folder":
        if os.path.exists(path) and not os.path.isdir(path):
            parser.error(f"--output {path!r} is a file; give a folder (it is created when missing)")
        os.makedirs(path, exist_ok=True)
        return
    if os.path.isdir(path):
        parser.error(f"--output {path!r} is a folder; give an image file name, e.g. {os.path.join(path, 'image.png')}")
    from PIL import Image

    extension = os.path.splitext(path)[1].lower()
    if extension not in Image.registered_extensions() or Image.registered_extensions()[extension] not in Image.SAVE:
        parser.error(f"--output {path!r}: the extension says which image format to write; use .png, .jpg or "
                     f".webp (got {extension or 'none'})")
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)


def require_local_dir(parser: argparse.ArgumentParser, flag: str, path: Optional[str], source: str = "") -> None:
    """An argparse error unless `path` is an existing folder; `source` names what to fetch."""
    if path is not None and not os.path.isdir(path):
        fetch = f": fetch {source} first and pass its local folder" if source else ""
        parser.error(f"{flag} {path!r} is not a directory (nothing is downloaded{fetch})")


def require_file(parser: argparse.ArgumentParser, flag: str, path: Optional[str]) -> None:
    if path is not None and not os.path.isfile(path):
        parser.error(f"{flag} {path!r} is not a file")


def require_positive(parser: argparse.ArgumentParser, **values: Optional[float]) -> None:
    """An argparse error for the first value <= 0; keyword names are flags with _ for -."""
    for name, value in values.items():
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
