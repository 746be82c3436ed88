"""Relative change of the image-text similarity under perturbation, (s_pert - s_orig) / s_orig."""

from __future__ import annotations

import torch
from torch import Tensor

# Direction as declared in clip_xai.schema.HIGHER_IS_BETTER["sim_diff"].
HIGHER_IS_BETTER = False

__all__ = ["HIGHER_IS_BETTER", "relative_similarity_change"]


def relative_similarity_change(s_orig: Tensor, s_pert: Tensor) -> Tensor:
    """``(s_pert - s_orig) / s_orig`` elementwise; shape (B,), float64 on the input device.

    IEEE semantics: s_orig == 0 gives ±inf (or NaN when s_pert is 0 too); no exception.
    """
    s_orig = torch.as_tensor(s_orig)
    s_pert = torch.as_tensor(s_pert, device=s_orig.device)
    if s_orig.shape != s_pert.shape:
        raise ValueError(f"similarity shapes differ: {tuple(s_orig.shape)} vs {tuple(s_pert.shape)}")
    s_orig = s_orig.to(torch.float64).reshape(-1)
    s_pert = s_pert.to(torch.float64).reshape(-1)
    return (s_pert - s_orig) / s_orig
