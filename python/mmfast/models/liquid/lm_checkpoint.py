"""Reading a transformers checkpoint directory (model.safetensors, or shards named by
model.safetensors.index.json) with the safetensors library: no pickle is ever read."""
from __future__ import annotations

import json
import os

from torch import nn

from .._checkpoint_files import read_safetensors

__all__ = ["LiquidLMCheckpointError", "load_safetensors_dir", "check_state"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class LiquidLMCheckpointError(ValueError):
    """A checkpoint directory whose files, keys or shapes do not fit LiquidLM."""


def load_safetensors_dir(local_dir: str, device=None) -> dict:
    """{name: tensor} of model.safetensors, or of the shards named by model.safetensors.index.json,
    read straight onto `device` (default CPU)."""
    single, index = os.path.join(local_dir, SAFE_WEIGHTS_NAME), os.path.join(local_dir, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LiquidLMCheckpointError(f"LiquidLM: {index!r} has no weight_map")
        files = [os.path.join(local_dir, name) for name in sorted(set(weight_map.values()))]
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"LiquidLM: shards listed in {index!r} are missing: {missing[:4]}")
    else:
        others = sorted(n for n in os.listdir(local_dir) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        hint = (f" (found {others[:3]}: pickle files are not read; convert them to safetensors with "
                "save_pretrained(safe_serialization=True))") if others else ""
        raise FileNotFoundError(f"LiquidLM: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in "
                                f"{local_dir!r}{hint}")
    state = {}
    for path in files:
        state.update(read_safetensors(path, "LiquidLM", device=device or "cpu", error=LiquidLMCheckpointError))
    return state


def check_state(model: nn.Module, state: dict, where: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k])}"
                 for k in expected if k in state and state[k].shape != expected[k]]
    if not (missing or unexpected or misshapen):
        return
    parts = [f"{name} ({len(items)}): {', '.join(items[:6])}{', ...' if len(items) > 6 else ''}"
             for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen))
             if items]
    raise LiquidLMCheckpointError(f"LiquidLM: the tensors in {where!r} do not fit its config.json: "
                                  + "; ".join(parts))
