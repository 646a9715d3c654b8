"""The model loaders' reads of a checkpoint's files (safetensors weights, JSON configs), with
errors that name the file and say what to do."""
from __future__ import annotations

import json
from typing import Dict, Optional, Type

import torch

# What an unreadable file most often is, and what to do about it.
_HINT = "an interrupted download or copy leaves a truncated file: fetch it again"


def read_safetensors(path: str, owner: str, *, device="cpu", dtype: Optional[torch.dtype] = None,
                     error: Type[Exception] = ValueError) -> Dict[str, torch.Tensor]:
    """{name: tensor} of the safetensors file at `path`, read onto `device` tensor by tensor; with
    `dtype`, each floating-point tensor is cast as it is read (one stored tensor in memory at a
    time, not a second full-size copy).

    Raises FileNotFoundError for a missing file, and `error` (the loader's own class), naming
    `owner` and the file, for one that is not readable safetensors (truncated, empty, another
    format): safetensors' own SafetensorError names neither. Running out of host or device
    memory while reading stays what it is (MemoryError, torch.OutOfMemoryError).
    """
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            return {key: _cast(f.get_tensor(key), dtype) for key in f.keys()}
    except (FileNotFoundError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:  # safetensors' error types differ across versions
        raise error(f"{owner}: {path} is not a readable safetensors file ({err}); {_HINT}") from err


def _cast(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def read_json(path: str, owner: str) -> dict:
    """The JSON object in the file at `path`. Raises FileNotFoundError for a missing file and
    ValueError naming `owner` and the file for one that is not valid JSON (json's own error
    names neither)."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{owner}: {path} is not valid JSON ({error})") from None
