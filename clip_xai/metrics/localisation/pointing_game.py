"""Pointing game (Zhang et al. 2018, "Top-down neural attention by excitation backprop", IJCV):
does the map's maximum fall inside the object mask? Higher is better."""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import flatten_map_mask, undefined_mask

HIGHER_IS_BETTER = True

__all__ = ["HIGHER_IS_BETTER", "pointing_game"]


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """1.0 when a pixel holding the map's maximum lies in the mask, else 0.0; shape (B,), float64.

    Ties: when several pixels share the maximum, it is a hit if *any* of them lies in the mask
    (Quantus' ``PointingGame`` convention; no tolerance band around the maximum). An empty or
    full mask, or a map holding NaN, gives NaN.
    """
    x, m = flatten_map_mask(maps, masks)
    at_max = x == x.amax(dim=1, keepdim=True)
    hit = (at_max & m).any(dim=1).to(torch.float64)
    bad = undefined_mask(m) | torch.isnan(x).any(dim=1)
    return hit.masked_fill(bad, float("nan"))
