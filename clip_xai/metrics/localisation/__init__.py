"""Localisation metrics: does the map point at the object? (Quantus' "localisation" category.)

One module per metric, each with a typed function on (B, H, W) non-negative maps and (B, H, W)
bool masks and a ``HIGHER_IS_BETTER`` constant: ``pointing_game``, ``energy_pointing_game``
(mass in the mask's bounding box), ``relevance_mass`` (mass in the mask), ``relevance_rank``
(top-|mask| pixels in the mask) and ``mask_auroc``; ``segmentation`` adds Chefer et al.'s
segmentation scores (``pixel_accuracy``, ``miou``, ``mean_ap`` of the map thresholded at its mean)
with the counts that pool them the reference's way. :class:`LocalisationMetrics` runs all of them
on a batch, on the maps' device, and flags samples where they are undefined.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.metrics.sensitivity.flags import unusable_rows

from . import auroc as _auroc_mod
from . import energy_pointing_game as _energy_mod
from . import pointing_game as _pointing_mod
from . import relevance_mass as _mass_mod
from . import relevance_rank as _rank_mod
from . import segmentation as _segmentation_mod
from .auroc import mask_auroc
from .energy_pointing_game import bounding_boxes, energy_pointing_game
from .pointing_game import pointing_game
from .relevance_mass import relevance_mass_accuracy
from .relevance_rank import relevance_rank_accuracy
from .segmentation import (SEGMENTATION_COUNTS, SEGMENTATION_METRICS, check_threshold, pooled_segmentation,
                           segmentation_scores)

# Result key -> True when higher is better (same as clip_xai.schema.HIGHER_IS_BETTER).
HIGHER_IS_BETTER: dict[str, bool] = {
    "pointing_game": _pointing_mod.HIGHER_IS_BETTER,
    "energy_pointing_game": _energy_mod.HIGHER_IS_BETTER,
    "relevance_mass": _mass_mod.HIGHER_IS_BETTER,
    "relevance_rank": _rank_mod.HIGHER_IS_BETTER,
    "mask_auroc": _auroc_mod.HIGHER_IS_BETTER,
    **{name: _segmentation_mod.HIGHER_IS_BETTER for name in SEGMENTATION_METRICS},
}
METRICS = {
    "pointing_game": pointing_game,
    "energy_pointing_game": energy_pointing_game,
    "relevance_mass": relevance_mass_accuracy,
    "relevance_rank": relevance_rank_accuracy,
    "mask_auroc": mask_auroc,
}

__all__ = [
    "HIGHER_IS_BETTER", "METRICS", "SEGMENTATION_COUNTS", "SEGMENTATION_METRICS", "LocalisationMetrics",
    "bounding_boxes", "energy_pointing_game", "mask_auroc", "pointing_game", "pooled_segmentation",
    "relevance_mass_accuracy", "relevance_rank_accuracy", "segmentation_scores",
]


class LocalisationMetrics:
    """All localisation metrics for a batch of maps and object masks.

    ``__call__(maps, masks, suffix="")`` takes (B, H, W) min-max maps at image size and (B, H, W)
    bool masks and returns float64 (B,) tensors under each :data:`METRICS` name (``_<suffix>``
    appended when given, e.g. ``pointing_game_pert``), ``mask_area`` (the mask's pixel fraction:
    the score of a uniform map for the mass and rank metrics, and the chance hit rate of the
    pointing game), and ``map_flag`` (B strings). Every metric is NaN for a flagged sample:
    ``empty_mask`` (no object pixels, e.g. an attribute absent from the image), ``full_mask``,
    ``nan_<tag>`` (map holds NaN/inf) or ``constant_<tag>`` (nothing to localise), where the tag is
    the suffix or ``clean``.

    The segmentation scores (:mod:`.segmentation`: :data:`SEGMENTATION_METRICS` and the
    :data:`SEGMENTATION_COUNTS` that pool them) are computed for every sample, flagged ones
    included, as the reference counts every image: a constant or NaN map predicts background
    everywhere; ``map_flag`` says which samples those are.

    ``mask`` (the yaml key ``metrics.mask``) names the mask the dataset reads:
    ``entire_object``, ``merged`` or a RIVAL10 attribute; the study writes it into every row.
    ``seg_threshold`` (``metrics.seg_threshold``): ``mean`` (Chefer et al.'s rule, the default) or a
    fixed number in [0, 1] applied to the min-max normalised map.
    """

    suite = "localisation"

    def __init__(self, mask: str = "entire_object", seg_threshold: str | float = "mean") -> None:
        self.mask = str(mask)
        self.seg_threshold = check_threshold(seg_threshold)

    def __repr__(self) -> str:
        return f"LocalisationMetrics(mask={self.mask!r}, seg_threshold={self.seg_threshold!r})"

    def __call__(self, maps: Tensor, masks: Tensor, suffix: str = "") -> dict[str, Tensor | list[str]]:
        if maps.dim() == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        masks = masks.to(device=maps.device, dtype=torch.bool)
        x = maps.reshape(maps.shape[0], -1)
        m = masks.reshape(masks.shape[0], -1)
        if x.shape != m.shape:
            raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape")
        nonfinite, constant = unusable_rows(x)
        area = m.sum(dim=1)
        empty, full = area == 0, area == m.shape[1]
        unusable = nonfinite | constant | empty | full
        tag = suffix or "clean"
        sfx = f"_{suffix}" if suffix else ""
        out: dict[str, Tensor | list[str]] = {
            f"{name}{sfx}": fn(maps, masks).masked_fill(unusable, float("nan")) for name, fn in METRICS.items()
        }
        out.update({f"{name}{sfx}": v for name, v in segmentation_scores(maps, masks, self.seg_threshold).items()})
        out["mask_area"] = area.to(torch.float64) / m.shape[1]
        names = ("empty_mask", "full_mask", f"nan_{tag}", f"constant_{tag}")
        bits = torch.stack([empty, full, nonfinite, constant], dim=1).tolist()  # one host transfer
        out["map_flag"] = ["+".join(n for n, b in zip(names, row) if b) for row in bits]
        return out
