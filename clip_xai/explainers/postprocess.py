"""The one place where raw maps become comparable maps (METHODS.md §2, preamble).

Image: per-sample min-max to [0,1], then bilinear resize to the image size (GE/PRED order:
normalise, then resize). Text: scores outside the caption tokens are zeroed, then min-max over
the caption tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12


def minmax(maps: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample min-max to [0,1] over all entries (or those where ``mask``).

    A constant map becomes all zeros (the sensitivity metrics then flag it and report NaN);
    NaN entries propagate so they are flagged too, never hidden.
    """
    flat = maps.flatten(1).float()
    if mask is None:
        lo, hi = flat.min(1).values, flat.max(1).values
    else:
        m = mask.flatten(1)
        lo = flat.masked_fill(~m, float("inf")).min(1).values
        hi = flat.masked_fill(~m, float("-inf")).max(1).values
    has_nan = torch.isnan(flat).any(1)
    span = (hi - lo).clamp_min(EPS)
    out = (flat - lo[:, None]) / span[:, None]
    out = torch.where((hi - lo)[:, None] > EPS, out, torch.zeros_like(out))
    out = torch.where(has_nan[:, None], torch.full_like(out, float("nan")), out)
    if mask is not None:
        out = out * mask.flatten(1)
    return out.view_as(maps)


def image_maps(raw: Tensor, size: tuple[int, int]) -> Tensor:
    """(B,h,w) raw maps → (B,H,W) min-max normalised maps at image size."""
    maps = minmax(raw)
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return maps


def text_maps(raw: Tensor, content_mask: Tensor) -> Tensor:
    """(B,L) raw token scores → min-max over caption tokens, zero elsewhere."""
    return minmax(raw * content_mask, content_mask)
