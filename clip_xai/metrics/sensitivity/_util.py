"""Small shared helpers for the sensitivity metrics (internal)."""

from __future__ import annotations

import torch
from torch import Tensor


def flatten_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Check that ``a`` and ``b`` are (B, ...) batches of equal shape; return them as (B, N)."""
    if a.shape != b.shape:
        raise ValueError(f"map shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"expected a batch of maps (B, ...), got shape {tuple(a.shape)}")
    if a.device != b.device:
        raise ValueError(f"maps are on different devices: {a.device} vs {b.device}")
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def nonfinite_rows(x: Tensor) -> Tensor:
    """(B, N) -> (B,) bool: the row holds a NaN or an inf."""
    return ~torch.isfinite(x).all(dim=1)
