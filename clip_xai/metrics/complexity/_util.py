"""Shared input handling for the complexity metrics (internal)."""

from __future__ import annotations

import torch
from torch import Tensor


def flat_abs(maps: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """(B, ...) maps and an optional same-shape bool ``valid`` → (|maps| as float64 (B, N), valid (B, N)).

    Entries outside ``valid`` (e.g. start/end/pad tokens of a text map) are set to 0 and must be
    ignored by the caller through the returned mask.
    """
    if maps.dim() < 2:
        raise ValueError(f"expected a batch of maps (B, ...), got shape {tuple(maps.shape)}")
    x = maps.reshape(maps.shape[0], -1).to(torch.float64).abs()
    if valid is None:
        m = torch.ones_like(x, dtype=torch.bool)
    else:
        if valid.shape != maps.shape:
            raise ValueError(f"valid mask shape {tuple(valid.shape)} differs from the maps' {tuple(maps.shape)}")
        m = valid.reshape(x.shape).to(device=x.device, dtype=torch.bool)
    return x.masked_fill(~m, 0.0), m
