"""Complexity: Shannon entropy of a map's normalised absolute values (Bhatt et al. 2020, "Evaluating
and aggregating feature-based model explanations", IJCAI). Lower = less complex (more concentrated)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import flat_abs

HIGHER_IS_BETTER = False

__all__ = ["HIGHER_IS_BETTER", "complexity"]


def complexity(maps: Tensor, valid: Tensor | None = None) -> Tensor:
    """``−Σ p_k ln p_k`` with ``p = |a| / Σ|a|`` over each map's entries (those where ``valid``); (B,), float64.

    Natural log, with 0·ln 0 = 0: 0 for a map with a single non-zero entry, ln n for a uniform map
    of n entries. A map whose absolute values sum to 0, or that holds NaN, gives NaN. Quantus'
    ``Complexity`` computes ``p·ln(p + 1e-12)`` instead, a difference below 1e-9 for these maps.
    """
    x, m = flat_abs(maps, valid)
    total = x.sum(dim=1, keepdim=True)
    p = x / total
    h = -torch.special.xlogy(p, p).sum(dim=1)
    bad = (total[:, 0] == 0) | torch.isnan(maps.reshape(maps.shape[0], -1)).any(dim=1).to(x.device) | (m.sum(1) == 0)
    return h.masked_fill(bad, float("nan"))
