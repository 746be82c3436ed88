"""Segmentation by a thresholded map (Chefer et al. 2021, "Transformer interpretability beyond
attention visualization", CVPR 2021) and ``baselines/ViT/imagenet_seg_eval.py`` of
hila-chefer/Transformer-Explainability, which LeGrad also reports on ImageNet-segmentation:
pixel accuracy, mIoU over foreground and background, and average precision of the pixel scores.
Higher is better for all three.

The protocol, per image: the image-size map is min-max normalised (over the map at image size, as
the reference does after its bilinear ×16 upsampling), thresholded at its mean (``gt(mean)`` =
foreground, ``le`` = background; the threshold rule is a setting), and a map that the normalisation
turns into NaN (constant, or holding NaN) predicts background everywhere with both soft scores 0,
as the reference's NaN zeroing does. AP scores the soft pair (1 − map for background, map for
foreground) against the one-hot mask as ONE ranking of 2·H·W scores (``get_ap_scores`` in
``utils/metrices.py`` flattens both channels together), with scikit-learn's step-wise
``average_precision_score`` (ties share a threshold).

The reference accumulates over the dataset: pixel accuracy = Σ correct / Σ labelled pixels, mIoU =
the mean over the two classes of Σ intersection / Σ union (sums over images), mAP = the mean of the
per-image APs. :func:`segmentation_scores` returns, per image, the three scores of that image alone
plus the six counts that :func:`pooled_segmentation` sums to reproduce the dataset-level numbers
exactly.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.schema import SEGMENTATION_COUNTS, SEGMENTATION_METRICS

HIGHER_IS_BETTER = True

# SEGMENTATION_METRICS: per-image scores (columns of the localisation study; ``_pert`` appended for
# the perturbed map); SEGMENTATION_COUNTS: per-image counts that pool to the reference's
# dataset-level numbers (:func:`pooled_segmentation`). Both are defined once, in the schema.
#: the reference's guard in every ratio (``np.spacing(1)`` added to the denominator)
SPACING = float(np.spacing(1, dtype=np.float64))

__all__ = [
    "HIGHER_IS_BETTER", "SEGMENTATION_COUNTS", "SEGMENTATION_METRICS", "average_precision", "check_threshold",
    "pooled_segmentation", "predict_foreground", "reference_scale", "segmentation_scores",
]


def check_threshold(rule: str | float) -> str | float:
    """``mean`` (the reference: foreground where the normalised map exceeds its mean) or a fixed
    number in [0, 1] (foreground where the normalised map exceeds it); anything else is an error."""
    if isinstance(rule, str) and rule.strip().lower() == "mean":
        return "mean"
    try:
        value = float(rule)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ClipXaiError(f"metrics.seg_threshold={rule!r} is not a threshold rule",
                           "use metrics.seg_threshold=mean (Chefer et al.'s rule) or a number in [0, 1]")
    return value


def reference_scale(maps: Tensor) -> tuple[Tensor, Tensor]:
    """(B, H, W) maps → ((B, N) min-max normalised float32 maps, (B,) bool invalid).

    Invalid rows (the map holds NaN/inf or is constant: the reference's min-max gives NaN there)
    are all zeros. Min-max commutes with bilinear upsampling (a convex combination), so applying it
    to this package's already normalised, upsampled maps gives the reference's map up to rounding.
    """
    x = maps.reshape(maps.shape[0], -1).float()
    finite = torch.isfinite(x).all(dim=1)
    safe = torch.where(finite[:, None], x, torch.zeros_like(x))
    lo, hi = safe.amin(dim=1, keepdim=True), safe.amax(dim=1, keepdim=True)
    invalid = ~finite | (hi[:, 0] <= lo[:, 0])
    span = torch.where(invalid[:, None], torch.ones_like(hi), hi - lo)
    scaled = torch.where(invalid[:, None], torch.zeros_like(x), (safe - lo) / span)
    return scaled, invalid


def predict_foreground(scaled: Tensor, invalid: Tensor, threshold: str | float = "mean") -> Tensor:
    """(B, N) bool foreground prediction: ``scaled > mean(scaled)`` per row (or ``> threshold``);
    invalid rows predict background everywhere (the reference's NaN comparisons are all False)."""
    t = scaled.mean(dim=1, keepdim=True) if threshold == "mean" else torch.full_like(scaled[:, :1], float(threshold))
    return (scaled > t) & ~invalid[:, None]


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Step-wise average precision of each row of ``scores`` (B, M) for bool ``targets`` (B, M),
    float64 (B,): Σ_k (R_k − R_{k−1}) P_k over the distinct score thresholds in decreasing order,
    i.e. scikit-learn's ``average_precision_score`` (tied scores enter at one threshold). Rows
    without a positive give 0 (the reference's ``nan_to_num`` of sklearn's undefined value)."""
    s, order = scores.float().sort(dim=1, descending=True)
    t = targets.gather(1, order).to(torch.float64)
    tp = t.cumsum(dim=1)
    ascending = (-s).contiguous()
    n_at_or_above = torch.searchsorted(ascending, ascending, right=True)  # end of each tie group
    precision = tp.gather(1, n_at_or_above - 1) / n_at_or_above.to(torch.float64)
    positives = t.sum(dim=1)
    ap = (precision * t).sum(dim=1) / positives.clamp_min(1)
    return torch.where(positives > 0, ap, torch.zeros_like(ap))


def segmentation_scores(maps: Tensor, masks: Tensor, threshold: str | float = "mean") -> dict[str, Tensor]:
    """Per-image :data:`SEGMENTATION_METRICS` and :data:`SEGMENTATION_COUNTS` as float64 (B,) tensors.

    ``maps`` (B, H, W) at mask size, ``masks`` (B, H, W) bool foreground. Every pixel is labelled
    (the masks have no ignore value). Per image: ``pixel_accuracy`` = correct / labelled,
    ``miou`` = (IoU_bg + IoU_fg) / 2 with IoU_c = inter_c / union_c (a class absent from both the
    mask and the prediction scores 0, as in the reference), ``mean_ap`` = AP of the soft pair.
    """
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3 or tuple(masks.shape) != tuple(maps.shape):
        raise ValueError(f"expected (B, H, W) maps and masks of equal shape, got {tuple(maps.shape)} and "
                         f"{tuple(masks.shape)}")
    scaled, invalid = reference_scale(maps)
    fg = masks.reshape(scaled.shape).to(device=scaled.device, dtype=torch.bool)
    pred = predict_foreground(scaled, invalid, check_threshold(threshold))
    n = fg.shape[1]

    def count(a: Tensor) -> Tensor:
        return a.sum(dim=1).to(torch.float64)

    inter_fg, inter_bg = count(pred & fg), count(~pred & ~fg)
    out = {
        "seg_correct": inter_fg + inter_bg,
        "seg_labeled": torch.full_like(inter_fg, float(n)),
        "seg_inter_bg": inter_bg, "seg_union_bg": count(~pred | ~fg),
        "seg_inter_fg": inter_fg, "seg_union_fg": count(pred | fg),
    }
    out["pixel_accuracy"] = out["seg_correct"] / (SPACING + out["seg_labeled"])
    out["miou"] = (out["seg_inter_bg"] / (SPACING + out["seg_union_bg"])
                   + out["seg_inter_fg"] / (SPACING + out["seg_union_fg"])) / 2
    soft = torch.cat([1 - scaled, scaled], dim=1).masked_fill(invalid[:, None], 0.0)  # (B, 2N): bg then fg
    out["mean_ap"] = average_precision(soft, torch.cat([~fg, fg], dim=1))
    return out


def pooled_segmentation(columns: Mapping[str, object], suffix: str = "") -> dict[str, float]:
    """The reference's dataset-level numbers from per-image rows (``columns``: a DataFrame or a
    mapping of column → values; ``suffix`` ``"pert"`` pools the ``*_pert`` columns).

    pixel_accuracy = Σ seg_correct / Σ seg_labeled; miou = ½ (Σ seg_inter_bg / Σ seg_union_bg +
    Σ seg_inter_fg / Σ seg_union_fg); mean_ap = the mean of the per-image mean_ap. Rows with a
    missing value (a sample without a mask) are left out of all three; no row gives NaN.
    """
    sfx = f"_{suffix}" if suffix else ""
    names = [*SEGMENTATION_COUNTS, "mean_ap"]
    try:
        arr = {c: np.asarray(columns[f"{c}{sfx}"], dtype=np.float64) for c in names}
    except KeyError:
        return {f"{m}{sfx}": float("nan") for m in SEGMENTATION_METRICS}
    keep = np.all([np.isfinite(v) for v in arr.values()], axis=0) if len(arr["mean_ap"]) else np.zeros(0, bool)
    if not keep.any():
        return {f"{m}{sfx}": float("nan") for m in SEGMENTATION_METRICS}
    s = {c: float(v[keep].sum()) for c, v in arr.items()}
    return {
        f"pixel_accuracy{sfx}": s["seg_correct"] / (SPACING + s["seg_labeled"]),
        f"miou{sfx}": (s["seg_inter_bg"] / (SPACING + s["seg_union_bg"])
                       + s["seg_inter_fg"] / (SPACING + s["seg_union_fg"])) / 2,
        f"mean_ap{sfx}": float(arr["mean_ap"][keep].mean()),
    }
