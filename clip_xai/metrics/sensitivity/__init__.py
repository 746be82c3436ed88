"""Sensitivity metrics: how much a saliency map changes when the input is perturbed (METHODS.md §3.2).

One module per metric, each with a typed function and a ``HIGHER_IS_BETTER`` constant:
``spearman``, ``ssim``, ``topk_intersection``, ``relative_similarity_change``. ``map_flags``
marks unusable maps. ``SensitivityMetrics`` runs all of them on a batch, on the maps' device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import similarity_change as _similarity_change_mod
from . import spearman as _spearman_mod
from . import ssim as _ssim_mod
from . import topk as _topk_mod
from .flags import FLAG_BITS, decode_flags, map_flag_codes, map_flags
from .similarity_change import relative_similarity_change
from .spearman import average_ranks, spearman
from .ssim import ssim
from .topk import topk_intersection

# Result key -> True when higher is better (same as clip_xai.schema.HIGHER_IS_BETTER).
HIGHER_IS_BETTER: dict[str, bool] = {
    "spearman": _spearman_mod.HIGHER_IS_BETTER,
    "ssim": _ssim_mod.HIGHER_IS_BETTER,
    "topk": _topk_mod.HIGHER_IS_BETTER,
    "sim_diff": _similarity_change_mod.HIGHER_IS_BETTER,
}

MAP_METRICS = ("spearman", "ssim", "topk")

__all__ = [
    "FLAG_BITS", "HIGHER_IS_BETTER", "MAP_METRICS", "SensitivityMetrics", "average_ranks",
    "decode_flags", "map_flag_codes", "map_flags", "relative_similarity_change", "spearman",
    "ssim", "topk_intersection",
]


class SensitivityMetrics:
    """All sensitivity metrics for a batch of clean/perturbed map pairs.

    ``__call__(clean_maps, pert_maps, s_orig, s_pert)`` takes (B, H, W) maps (already min-max
    normalised and upsampled) and (B,) image-text similarities, and returns float64 (B,) tensors on
    the maps' device under ``spearman``, ``ssim``, ``topk``, ``sim_diff``, plus ``map_flag`` (a list
    of B strings). SSIM takes its data range from the perturbed map, as the thesis did. Where a map
    is constant or holds NaN/inf the three map metrics are NaN (``sim_diff`` is still computed) and
    ``map_flag`` names the reason.
    """

    suite = "sensitivity"

    def __init__(self, k: int = 100, ssim_chunk: int = 64) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if ssim_chunk < 1:
            raise ValueError(f"ssim_chunk must be >= 1, got {ssim_chunk}")
        self.k = k
        self.ssim_chunk = ssim_chunk

    def __repr__(self) -> str:
        return f"SensitivityMetrics(k={self.k}, ssim_chunk={self.ssim_chunk})"

    def __call__(
        self, clean_maps: Tensor, pert_maps: Tensor, s_orig: Tensor, s_pert: Tensor
    ) -> dict[str, Tensor | list[str]]:
        if clean_maps.dim() == 4 and clean_maps.shape[1] == 1:
            clean_maps = clean_maps[:, 0]
        if pert_maps.dim() == 4 and pert_maps.shape[1] == 1:
            pert_maps = pert_maps[:, 0]
        if clean_maps.dim() != 3 or clean_maps.shape != pert_maps.shape:
            raise ValueError(
                f"expected two (B, H, W) map batches of equal shape, got "
                f"{tuple(clean_maps.shape)} and {tuple(pert_maps.shape)}"
            )
        device = clean_maps.device
        codes = map_flag_codes(clean_maps, pert_maps)
        unusable = codes != 0
        out: dict[str, Tensor | list[str]] = {
            "spearman": spearman(clean_maps, pert_maps),
            "ssim": ssim(clean_maps, pert_maps, chunk=self.ssim_chunk),
            "topk": topk_intersection(clean_maps, pert_maps, k=self.k),
        }
        for name in MAP_METRICS:
            out[name] = out[name].masked_fill(unusable, float("nan"))
        s_orig = torch.as_tensor(s_orig, device=device)
        s_pert = torch.as_tensor(s_pert, device=device)
        out["sim_diff"] = relative_similarity_change(s_orig, s_pert)
        out["map_flag"] = decode_flags(codes)
        return out
