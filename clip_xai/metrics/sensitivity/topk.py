"""Top-K intersection: shared fraction of the K highest-scoring pixels of two maps (higher = more stable)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import flatten_pair

HIGHER_IS_BETTER = True

__all__ = ["HIGHER_IS_BETTER", "topk_intersection"]


def topk_intersection(a: Tensor, b: Tensor, k: int = 100) -> Tensor:
    """``|topk_idx(a_i) ∩ topk_idx(b_i)| / k`` on the flattened maps, per sample; shape (B,), float64.

    The index sets come from ``torch.topk`` (K = 100 in the thesis). Tie-breaking caveat: upsampled
    maps have large plateaus of equal values, and which tied pixels ``torch.topk`` returns is an
    implementation detail (it may differ between CPU and CUDA and between torch versions). The
    score then depends on that choice; this is the thesis's convention and is kept as is.
    A map holding a NaN gives NaN (``torch.topk`` would rank NaN above every number).
    """
    x, y = flatten_pair(a, b)
    n = x.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for maps of {n} pixels, got {k}")
    idx_a = torch.topk(x, k, dim=1).indices
    idx_b = torch.topk(y, k, dim=1).indices
    in_a = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(1, idx_a, True)
    shared = in_a.gather(1, idx_b).sum(dim=1)  # topk indices are distinct, so this is |A ∩ B|
    score = shared.to(torch.float64) / k
    has_nan = torch.isnan(x).any(dim=1) | torch.isnan(y).any(dim=1)
    return score.masked_fill(has_nan, float("nan"))
