"""Relevance rank accuracy (Arras et al. 2022, "CLEVR-XAI"): of the K = |mask| highest-scoring
pixels, the fraction inside the mask. Higher is better."""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import flatten_map_mask, undefined_mask

HIGHER_IS_BETTER = True

__all__ = ["HIGHER_IS_BETTER", "relevance_rank_accuracy"]


def relevance_rank_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    """``|top-K(a) ∩ mask| / K`` with ``K = |mask|``; shape (B,), float64.

    Ties at the K-th largest value are resolved by their *expected* share: with t the K-th
    largest value, the pixels above t count fully and the ``K − |{a > t}|`` remaining slots are
    filled from the pixels equal to t in proportion to how many of those lie in the mask. This
    equals the mean over every tie-breaking order, so the score never depends on a sort's
    arbitrary choice (Quantus' ``RelevanceRankAccuracy`` takes ``np.argsort``'s order and agrees
    whenever the K-th value is not tied). A uniform map scores the mask's area fraction. An empty or
    full mask, or a map holding NaN, gives NaN.
    """
    x, m = flatten_map_mask(maps, masks)
    k = m.sum(dim=1)
    values = torch.sort(x, dim=1, descending=True).values
    t = values.gather(1, (k - 1).clamp_min(0)[:, None])
    above, tied = x > t, x == t
    n_above = above.sum(dim=1)
    in_above = (above & m).sum(dim=1).to(torch.float64)
    in_tied = (tied & m).sum(dim=1).to(torch.float64)
    n_tied = tied.sum(dim=1).to(torch.float64).clamp_min(1)
    score = (in_above + (k - n_above).to(torch.float64) * in_tied / n_tied) / k.to(torch.float64).clamp_min(1)
    bad = undefined_mask(m) | torch.isnan(x).any(dim=1)
    return score.masked_fill(bad, float("nan"))
