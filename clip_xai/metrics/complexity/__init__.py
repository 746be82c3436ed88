"""Complexity metrics: how concentrated is a map? (Quantus' "complexity" category.)

One module per metric, each with a typed function and a ``HIGHER_IS_BETTER`` constant:
``sparseness`` (Gini index, Chalasani et al. 2020) and ``complexity`` (entropy, Bhatt et al.
2020). :func:`complexity_columns` gives both for a batch of maps, named with a suffix, so every
study that has maps adds the same two columns (``sparseness``/``complexity`` for the clean map,
``*_pert`` for the perturbed one, ``*_image``/``*_text`` in the faithfulness study, ...).
Both use absolute values; the maps of this package are min-max normalised, hence non-negative.
"""

from __future__ import annotations

from torch import Tensor

from . import entropy as _entropy_mod
from . import sparseness as _sparseness_mod
from .entropy import complexity
from .sparseness import sparseness

HIGHER_IS_BETTER: dict[str, bool] = {
    "sparseness": _sparseness_mod.HIGHER_IS_BETTER,
    "complexity": _entropy_mod.HIGHER_IS_BETTER,
}

__all__ = ["HIGHER_IS_BETTER", "complexity", "complexity_columns", "column_names", "sparseness"]


def column_names(suffix: str = "") -> list[str]:
    """The two column names for ``suffix`` ("" → ``sparseness``, ``complexity``; "pert" → ``sparseness_pert``, ...)."""
    return [f"{name}_{suffix}" if suffix else name for name in HIGHER_IS_BETTER]


def complexity_columns(maps: Tensor, suffix: str = "", valid: Tensor | None = None) -> dict[str, Tensor]:
    """``{sparseness[_suffix]: (B,), complexity[_suffix]: (B,)}`` float64 tensors on the maps' device."""
    s, c = column_names(suffix)
    return {s: sparseness(maps, valid), c: complexity(maps, valid)}
