"""Spearman rank correlation between clean and perturbed maps, per sample (higher = more stable)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import flatten_pair

HIGHER_IS_BETTER = True

__all__ = ["HIGHER_IS_BETTER", "average_ranks", "spearman"]


def average_ranks(x: Tensor) -> Tensor:
    """Row-wise ranks 1..N of a (B, N) tensor, ties getting the mean of their ranks.

    Same convention as ``scipy.stats.rankdata(method="average")``. Vectorised over the batch:
    one stable sort, then each element's tie group is delimited by the first and last sorted
    position holding the same value (a running max of group starts and a reversed running min
    of group ends); the average rank of the group is ``(first + last) / 2 + 1``. Returns float64.
    NaNs never compare equal, so each NaN forms its own group (callers decide what NaN means).
    """
    if x.dim() != 2:
        raise ValueError(f"expected (B, N), got shape {tuple(x.shape)}")
    n_rows, n = x.shape
    if n == 0:
        return torch.empty(n_rows, 0, dtype=torch.float64, device=x.device)
    values, order = torch.sort(x, dim=1, stable=True)
    pos = torch.arange(n, device=x.device).expand(n_rows, n)
    new_value = values[:, 1:] != values[:, :-1]  # (B, N-1): a new tie group starts at j+1
    edge = torch.ones(n_rows, 1, dtype=torch.bool, device=x.device)
    is_first = torch.cat([edge, new_value], dim=1)
    is_last = torch.cat([new_value, edge], dim=1)
    first = torch.where(is_first, pos, torch.zeros_like(pos)).cummax(dim=1).values
    last_rev = torch.where(is_last, pos, torch.full_like(pos, n)).flip(1).cummin(dim=1).values
    last = last_rev.flip(1)
    sorted_ranks = (first + last).to(torch.float64) * 0.5 + 1.0
    ranks = torch.empty(n_rows, n, dtype=torch.float64, device=x.device)
    ranks.scatter_(1, order, sorted_ranks)
    return ranks


def _pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise Pearson correlation of two float64 (B, N) tensors; 0/0 (constant row) -> NaN."""
    xc = x - x.mean(dim=1, keepdim=True)
    yc = y - y.mean(dim=1, keepdim=True)
    num = (xc * yc).sum(dim=1)
    den = torch.sqrt((xc * xc).sum(dim=1) * (yc * yc).sum(dim=1))
    r = num / den  # den == 0 -> NaN (num is 0 too) like scipy's constant-input result
    return r.clamp(-1.0, 1.0)  # clamp keeps NaN


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rho between ``a[i].flatten()`` and ``b[i].flatten()`` for each i; shape (B,).

    Matches ``scipy.stats.spearmanr(a_i.ravel(), b_i.ravel()).statistic`` (average ranks for ties,
    Pearson correlation of the ranks in float64). A constant map gives NaN (scipy also returns NaN,
    with a warning); a map holding any NaN gives NaN (scipy's default ``nan_policy="propagate"``).
    +-inf values are ranked like ordinary values, as scipy does. Result: float64 on ``a.device``.
    """
    x, y = flatten_pair(a, b)
    rho = _pearson_rows(average_ranks(x), average_ranks(y))
    has_nan = torch.isnan(x).any(dim=1) | torch.isnan(y).any(dim=1)
    return rho.masked_fill(has_nan, float("nan"))
