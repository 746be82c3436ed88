"""Relevance mass accuracy (Arras et al. 2022, "CLEVR-XAI", Information Fusion): the share of the
map's mass inside the object mask. Higher is better."""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import flatten_map_mask, undefined_mask

HIGHER_IS_BETTER = True

__all__ = ["HIGHER_IS_BETTER", "relevance_mass_accuracy"]


def relevance_mass_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    """``Σ_{mask} a / Σ a`` per sample; shape (B,), float64.

    Maps must be non-negative (min-max maps are; Arras et al. keep positive relevance only). A
    uniform map scores the mask's area fraction. A map summing to 0, an empty or full mask, or
    a map holding NaN gives NaN.
    """
    x, m = flatten_map_mask(maps, masks)
    total = x.sum(dim=1)
    share = (x * m).sum(dim=1) / total
    bad = undefined_mask(m) | (total == 0) | torch.isnan(total)
    return share.masked_fill(bad, float("nan"))
