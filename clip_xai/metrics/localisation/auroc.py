"""AUROC of the map as a detector of mask pixels: the probability that a random object pixel
scores higher than a random background pixel (ties count one half). 0.5 = chance; higher is better."""

from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.metrics.sensitivity.spearman import average_ranks

from ._util import flatten_map_mask, undefined_mask

HIGHER_IS_BETTER = True

__all__ = ["HIGHER_IS_BETTER", "mask_auroc"]


def mask_auroc(maps: Tensor, masks: Tensor) -> Tensor:
    """Area under the ROC curve of ``maps[i]`` scoring ``masks[i]``'s pixels; shape (B,), float64.

    Computed as the Mann–Whitney U statistic from average ranks,
    ``(Σ_{mask} rank − n₁(n₁+1)/2) / (n₁ n₀)``, which equals the trapezoidal area under the ROC
    curve with tied scores (``sklearn.metrics.roc_auc_score``; Quantus' ``AUC``). A constant map
    scores 0.5. An empty or full mask, or a map holding NaN, gives NaN.
    """
    x, m = flatten_map_mask(maps, masks)
    ranks = average_ranks(x)
    n1 = m.sum(dim=1).to(torch.float64)
    n0 = m.shape[1] - n1
    u = (ranks * m).sum(dim=1) - n1 * (n1 + 1) / 2
    auc = u / (n1 * n0)
    bad = undefined_mask(m) | torch.isnan(x).any(dim=1)
    return auc.masked_fill(bad, float("nan"))
