"""Energy-based pointing game (Wang et al. 2020, "Score-CAM", CVPRW §4.2): the share of the map's
mass inside the object's bounding box. Higher is better."""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import flatten_map_mask, undefined_mask

HIGHER_IS_BETTER = True

__all__ = ["HIGHER_IS_BETTER", "bounding_boxes", "energy_pointing_game"]


def bounding_boxes(masks: Tensor) -> Tensor:
    """(B, H, W) bool masks → (B, H, W) bool filled axis-aligned bounding boxes (empty stays empty)."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)

    def span(a: Tensor) -> Tensor:
        n = a.shape[1]
        idx = torch.arange(n, device=a.device)
        first = torch.where(a, idx, n).amin(dim=1, keepdim=True)
        last = torch.where(a, idx, -1).amax(dim=1, keepdim=True)
        return (idx >= first) & (idx <= last)

    return span(rows)[:, :, None] & span(cols)[:, None, :]


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """``Σ_{box} a / Σ a`` with the box = the mask's bounding box (Score-CAM used boxes); (B,), float64.

    Maps must be non-negative (the min-max maps of this package are). A map summing to 0, an
    empty or full mask, or a map holding NaN gives NaN. Equals Quantus' ``AttributionLocalisation``
    (Kohlbrenner et al. 2020) given the box as its segmentation, up to its 1e-9 in the denominator.
    """
    box = bounding_boxes(masks.to(torch.bool))
    x, b = flatten_map_mask(maps, box)
    _, m = flatten_map_mask(maps, masks)
    total = x.sum(dim=1)
    share = (x * b).sum(dim=1) / total
    bad = undefined_mask(m) | (total == 0) | torch.isnan(total)
    return share.masked_fill(bad, float("nan"))
