"""Sparseness: the Gini index of a map's absolute values (Chalasani et al. 2020, "Concise explanations
of neural networks using adversarial training", ICML). Higher = sparser (mass on fewer entries)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import flat_abs

HIGHER_IS_BETTER = True

__all__ = ["HIGHER_IS_BETTER", "sparseness"]


def sparseness(maps: Tensor, valid: Tensor | None = None) -> Tensor:
    """Gini index of ``|maps[i]|`` over its entries (those where ``valid``); shape (B,), float64.

    With the n values sorted ascending, a_(1) <= ... <= a_(n):
    ``G = Σ_k (2k − n − 1) a_(k) / (n Σ_k a_(k))``. 0 for a uniform map, (n−1)/n for a map with a
    single non-zero entry. Ties do not matter (tied values are interchangeable in the sum). A map
    whose absolute values sum to 0, or that holds NaN, gives NaN. Quantus' ``Sparseness`` adds
    1e-7 to every entry first; that shifts G by about 1e-7/mean(|a|) (checked in the tests).
    """
    x, m = flat_abs(maps, valid)
    n = m.sum(dim=1)
    # invalid entries sort last (+inf), so the k-th smallest valid value sits at sorted position k-1
    s = torch.sort(x.masked_fill(~m, float("inf")), dim=1).values
    s = torch.where(torch.isinf(s), torch.zeros_like(s), s)
    k = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float64)
    nf = n.to(torch.float64)[:, None]
    weight = torch.where(k[None] <= nf, 2 * k[None] - nf - 1, torch.zeros_like(s))
    total = x.sum(dim=1)
    g = (weight * s).sum(dim=1) / (n.to(torch.float64) * total)
    bad = (total == 0) | torch.isnan(maps.reshape(maps.shape[0], -1)).any(dim=1).to(x.device) | (n == 0)
    return g.masked_fill(bad, float("nan"))
