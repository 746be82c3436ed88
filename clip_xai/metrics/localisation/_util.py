"""Shared input handling for the localisation metrics (internal)."""

from __future__ import annotations

import torch
from torch import Tensor


def flatten_map_mask(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """(B, H, W) maps and (B, H, W) masks → float64 (B, N) maps and bool (B, N) masks."""
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3 or tuple(masks.shape) != tuple(maps.shape):
        raise ValueError(f"expected (B, H, W) maps and masks of equal shape, got {tuple(maps.shape)} and "
                         f"{tuple(masks.shape)}")
    x = maps.reshape(maps.shape[0], -1).to(torch.float64)
    m = masks.reshape(x.shape).to(device=x.device, dtype=torch.bool)
    return x, m


def undefined_mask(m: Tensor) -> Tensor:
    """(B,) bool: the mask is empty or covers every pixel (no localisation score is defined)."""
    n = m.sum(dim=1)
    return (n == 0) | (n == m.shape[1])
