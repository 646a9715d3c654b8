"""The arguments every example shares (--device, --backend, --output) and the checks that turn
a user's ordinary mistake (no GPU, a folder that does not exist, an output path of the wrong
kind or in a place that cannot be written) into one argparse error line, exit status 2, before
any work starts, instead of a traceback after it. The checks create nothing: the examples make
their output folders when they write. Used by examples/*.py; the ops and models do not need it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import NoReturn, Optional

import torch

from ._backend import BACKENDS

__all__ = ["add_device_arguments", "add_output_argument", "check_device", "check_output", "require_local_dir",
           "require_file", "require_path", "require_positive", "exit_on_vqgan_checkpoint_error", "given_options",
           "refuse_options"]


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


def check_device(parser: argparse.ArgumentParser, device: str, backend: Optional[str] = None) -> torch.device:
    """The torch.device of --device; an argparse error for a malformed name, a device that is
    not there (CUDA: said in CUDA's terms; others, e.g. mps / xpu: by placing a tensor on it),
    the meta device (no data to compute on), and a --backend that cannot run there (triton:
    CUDA, or the CPU under TRITON_INTERPRET=1, with triton installed)."""
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        parser.error(f"--device {device!r}: {error}")
    if parsed.type == "meta":
        parser.error(f"--device {device}: meta tensors hold no data to compute on; use --device cpu or cuda")
    if backend == "triton":
        _check_triton_runs(parser, parsed)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__} here "
                         f"(CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            parser.error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif parsed.type != "cpu":
        try:
            torch.empty(0, device=parsed)
        except (RuntimeError, AssertionError) as error:  # torch raises either for a missing backend
            reason = str(error).split(". ")[0][:200]  # torch's dispatcher error runs to a page
            parser.error(f"--device {device}: torch cannot place a tensor there ({reason}); use --device cpu")
    return parsed


def _check_triton_runs(parser: argparse.ArgumentParser, device: torch.device) -> None:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        parser.error("--backend triton: triton is not installed (pip install triton); use --backend native")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--backend triton runs on CUDA tensors, and on the CPU only under Triton's interpreter: "
                     "set TRITON_INTERPRET=1, or use --device cuda or --backend native")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--backend triton does not run on {device.type} tensors; use --backend native")


def check_output(parser: argparse.ArgumentParser, path: Optional[str], *, kind: str) -> Optional[str]:
    """--output, '~' expanded, checked before the run: a folder (kind "folder") must be one or be
    creatable; an image file (kind "image") needs an extension Pillow can write and a folder
    that is or can be made (proven by making and removing an empty folder in its nearest existing
    ancestor; nothing is left). Returns the expanded path (None stays None)."""
    if path is None:
        return None
    if not path.strip():
        parser.error("--output is empty; give a path")
    path = os.path.expanduser(path)
    if kind == "folder":
        if os.path.exists(path) and not os.path.isdir(path):
            parser.error(f"--output {path!r} is a file; give a folder (it is created when missing)")
        _check_creatable(parser, path)
        return path
    if os.path.isdir(path):
        parser.error(f"--output {path!r} is a folder; give an image file name, e.g. {os.path.join(path, 'image.png')}")
    from PIL import Image

    extension = os.path.splitext(path)[1].lower()
    if extension not in Image.registered_extensions() or Image.registered_extensions()[extension] not in Image.SAVE:
        parser.error(f"--output {path!r}: the extension says which image format to write; use .png, .jpg or "
                     f".webp (got {extension or 'none'})")
    _check_creatable(parser, os.path.dirname(os.path.abspath(path)))
    return path


def _check_creatable(parser: argparse.ArgumentParser, folder: str) -> None:
    """An argparse error unless `folder` is, or can be made as, a writable folder: its nearest
    existing ancestor must be a folder this process may write into."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        parser.error(f"--output {folder!r}: {existing!r} is a file, so no folder can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--output {folder!r}: {existing!r} is not writable")
    # os.access says yes to root everywhere, also where nothing can be made (/proc, a read-only
    # mount): a folder made and removed at once tells, before hours of work that would not be saved
    try:
        probe = tempfile.mkdtemp(prefix=".mmfast-output-check-", dir=existing)
    except OSError as error:
        parser.error(f"--output {folder!r}: no folder can be made in {existing!r} ({error.strerror})")
    os.rmdir(probe)  # an empty folder this process just made


def require_local_dir(parser: argparse.ArgumentParser, flag: str, path: Optional[str], source: str = "") -> None:
    """An argparse error unless `path` is an existing folder; `source` names what to fetch."""
    if path is not None and not os.path.isdir(path):
        fetch = f": fetch {source} first and pass its local folder" if source else ""
        parser.error(f"{flag} {path!r} is not a directory (nothing is downloaded{fetch})")


def require_file(parser: argparse.ArgumentParser, flag: str, path: Optional[str]) -> None:
    if path is not None and not os.path.isfile(path):
        parser.error(f"{flag} {path!r} is not a file")


def require_path(parser: argparse.ArgumentParser, flag: str, path: Optional[str], what: str) -> None:
    """An argparse error unless `path` exists (a file or a folder, as `what` says)."""
    if path is not None and not os.path.exists(path):
        parser.error(f"{flag} {path!r} does not exist ({what}; nothing is downloaded)")


def require_positive(parser: argparse.ArgumentParser, **values: Optional[float]) -> None:
    """An argparse error for the first value <= 0; keyword names are flags with _ for -."""
    for name, value in values.items():
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")


_UNSET = object()
# Actions that build on the value already there (None is their empty start, not the sentinel).
_ACCUMULATING = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction, argparse._ExtendAction)


def given_options(parser: argparse.ArgumentParser, argv: Optional[list] = None) -> set:
    """The dests the command line sets itself, defaults left out (argparse keeps a namespace's
    existing attributes instead of its defaults, so every dest starts unset)."""
    start = {action.dest: None if isinstance(action, _ACCUMULATING) else _UNSET for action in parser._actions
             if action.dest is not argparse.SUPPRESS}
    namespace = parser.parse_args(argv, namespace=argparse.Namespace(**start))
    return {dest for dest, value in vars(namespace).items()
            if (value is not None if start.get(dest, _UNSET) is None else value is not _UNSET)}


def refuse_options(parser: argparse.ArgumentParser, dests, reason: str, argv: Optional[list] = None) -> None:
    """argparse error naming the options among `dests` given on the command line (by their first
    flag), which would otherwise be silently ignored (reason: with what they go)."""
    given = given_options(parser, argv) & set(dests)
    flags = [action.option_strings[0] for action in parser._actions if action.dest in given and action.option_strings]
    if flags:
        parser.error(f"{', '.join(flags)}: {reason}")


def exit_on_vqgan_checkpoint_error(script: str, error: Exception, flag: str, config: str) -> NoReturn:
    """Exits with one line for a VQGANCheckpointError (not a traceback), suggesting the other
    config (`flag` chameleon / tiny) only when the file was read and its architecture is another."""
    hint = ""
    if getattr(error, "architecture_mismatch", False):
        other = "chameleon" if config == "tiny" else "tiny"
        hint = f"\n({flag} {config} gave the architecture: is the checkpoint another one's, e.g. {flag} {other}?)"
    sys.exit(f"{script}: error: {error}{hint}")
