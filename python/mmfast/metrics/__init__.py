"""Evaluation metrics. `dis`: the dichotomous image segmentation metrics (F-measures, weighted F,
MAE, S-measure, E-measures, HCE) of DiffDIS / MVANet / BiRefNet, matching pysodmetrics.

The names are loaded from `dis` on first use, so that `python -m mmfast.metrics.dis` does not
find the module already imported (runpy warns about that)."""
from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "PROTOCOLS", "HCE_VARIANTS", "METRIC_NAMES", "prepare", "f_measure", "weighted_f_measure", "mae", "s_measure",
    "e_measure", "human_correction_effort", "DISMetrics", "evaluate_folders", "format_table",
]

if TYPE_CHECKING:
    from .dis import (HCE_VARIANTS, METRIC_NAMES, PROTOCOLS, DISMetrics, e_measure, evaluate_folders, f_measure,
                      format_table, human_correction_effort, mae, prepare, s_measure,
                      weighted_f_measure)


def __getattr__(name: str):
    if name in __all__:
        from . import dis

        return getattr(dis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
