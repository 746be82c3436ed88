"""Positive/negative perturbation curves (Chefer et al., CVPR 2021), on a zero-shot classifier head.

Follows ``baselines/ViT/pertubation_eval_from_hdf5.py`` in hila-chefer/Transformer-Explainability
(METHODS.md §3.6): the map is upsampled to the input (bilinear, ``align_corners=False``) and then
min-maxed, as ``generate_visualizations.py`` stores it; at each step the ``k`` pixels with the
highest map values (``torch.topk`` over the flattened map; the negated map for ``negative``) are set
to 0 in all three channels of the unnormalised [0,1] image, which is then normalised and classified.

Ties: the ×16 bilinear upsampling of a 14×14 map replicates its border cells over 8-pixel bands
(``align_corners=False`` clamps the source coordinate there), so a map has runs of equal values and
which of them ``topk`` takes is torch's choice (it differs between CPU and CUDA kernels). The
reference keeps that quirk and so does ``ties="topk"`` (default); ``ties="raster"`` takes equal
values in raster order (a stable descending sort) instead.

Per step and sample (the reference's definitions): ``hit`` = top-1 == the label; ``prob_diff`` =
top-1 softmax probability − the clean image's top-1 probability (the two top classes may differ);
``logit_diff`` likewise for the top logit; ``log_odds`` = log(p_label / p_second), p_second the
second-largest probability of that image (whatever the label's rank). Point 0 is the clean image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.postprocess import minmax

#: ``scale`` → (base, steps): ``k = int(base · step)`` pixels at each step; ``per`` takes its base
#: from the input (224² in the reference), ``100`` is the reference's absolute 100 · (5…45) pixels.
SCALES: dict[str, tuple[int | None, tuple[float, ...]]] = {
    "per": (None, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)),
    "100": (100, (5, 10, 15, 20, 25, 30, 35, 40, 45)),
}
DIRECTIONS = ("positive", "negative")
TIES = ("topk", "raster")
CURVES = ("hit", "prob_diff", "logit_diff", "log_odds")


def removal_counts(scale: str, n_pixels: int, steps=None) -> list[int]:
    """The reference's ``k = int(base · step)`` per step for an input of ``n_pixels`` pixels
    (``steps`` overrides the scale's own); one clear error when a step removes no pixel or more
    pixels than there are, or the steps do not increase."""
    if str(scale) not in SCALES:
        raise ClipXaiError(f"study.scale={scale!r} is not known",
                           "use study.scale=per (10%…90% of the pixels) or 100 (100·5…100·45 pixels, the reference's --scale 100)")
    base, default_steps = SCALES[str(scale)]
    base = n_pixels if base is None else base
    steps = default_steps if steps is None else tuple(steps)
    if not steps:
        raise ClipXaiError("study.steps is empty", "use study.steps=null (the reference's steps) or a list")
    ks = [int(base * float(s)) for s in steps]
    if any(k < 1 or k > n_pixels for k in ks) or any(b <= a for a, b in zip(ks, ks[1:])):
        raise ClipXaiError(
            f"study.steps={list(steps)} with study.scale={scale} remove {ks} pixels of an image of {n_pixels}",
            f"give increasing steps that remove between 1 and {n_pixels} pixels "
            f"({'fractions in (0, 1]' if SCALES[str(scale)][0] is None else f'k = {base}·step'})")
    return ks


def removal_fractions(scale: str, n_pixels: int, steps=None) -> list[float]:
    """The x of each step, as the authors plot it: the nominal step for ``per`` (0.1…0.9; the
    ``int`` in k = int(step·H·W) removes at most one pixel fewer), ``k / (H·W)`` for ``100``."""
    counts = removal_counts(scale, n_pixels, steps)
    if SCALES[str(scale)][0] is None:
        return [float(s) for s in (SCALES[str(scale)][1] if steps is None else steps)]
    return [k / n_pixels for k in counts]


def reference_maps(raw: Tensor, size: tuple[int, int]) -> Tensor:
    """(B,h,w) raw maps → (B,H,W) float32: bilinear upsampling to ``size`` first, then per-sample
    min-max (the reference's order; :func:`~clip_xai.explainers.postprocess.image_maps` normalises
    first, which ranks the same pixels up to float rounding, and rounding decides ties)."""
    maps = raw.float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return minmax(maps)


def removal_order(maps: Tensor, k: int, direction: str, ties: str = "topk") -> Tensor:
    """(B, k) flat pixel indices removed first: the top ``k`` of the map (of −map for ``negative``)."""
    vis = maps.flatten(1)
    vis = -vis if direction == "negative" else vis
    if ties == "topk":
        return torch.topk(vis, k, dim=-1).indices
    return torch.sort(vis, dim=-1, descending=True, stable=True).indices[:, :k]


def remove_pixels(pixels: Tensor, index: Tensor) -> Tensor:
    """``pixels`` (B,3,H,W) with the flat pixels ``index`` (B,k) set to 0 in all channels (a copy)."""
    b, c = pixels.shape[:2]
    flat = pixels.reshape(b, c, -1).clone()
    flat.scatter_(-1, index[:, None, :].expand(b, c, index.shape[1]), 0.0)
    return flat.view_as(pixels)


def point_scores(logits: Tensor, label: Tensor, clean_logits: Tensor) -> dict[str, Tensor]:
    """The four per-step quantities (see the module docstring), float32 (B,) each."""
    probs = logits.softmax(1)
    clean_probs = clean_logits.softmax(1)
    top_prob, top_logit = probs.max(1).values, logits.max(1).values
    p_label = probs.gather(1, label[:, None])[:, 0]
    p_second = probs.topk(2, dim=1).values[:, 1]
    return {
        "hit": (logits.argmax(1) == label).float(),
        "prob_diff": top_prob - clean_probs.max(1).values,
        "logit_diff": top_logit - clean_logits.max(1).values,
        "log_odds": torch.log(p_label / p_second),
    }


def curve_auc(fraction, values, close_at_one: bool = False) -> float:
    """Trapezoid area under ``values`` over ``fraction`` (removed share of the pixels, [0,1] units).
    ``close_at_one`` appends the point (1.0, 0.0), as the authors' AUC script does for the accuracy
    curve (clean point, the nine steps, then 0 at 100% removed)."""
    x, y = np.asarray(fraction, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if close_at_one:
        x, y = np.append(x, 1.0), np.append(y, 0.0)
    return float(np.sum((y[1:] + y[:-1]) / 2.0 * np.diff(x)))


class PerturbationCurveMetrics:
    """The ``metrics=perturbation_curve`` option the study selects: the functions of this module;
    every setting lives on the study (``study.*``, :mod:`clip_xai.studies.perturbation_curve`)."""

    suite = "perturbation_curve"


@dataclass
class Curves:
    """Per-sample curves (B, 1 + steps) float64 on the CPU, point 0 = the clean image."""

    fraction: list[float]
    values: dict[str, Tensor]

    def auc(self, name: str, close_at_one: bool = False) -> Tensor:
        return torch.tensor([curve_auc(self.fraction, row, close_at_one and name == "hit")
                             for row in self.values[name].tolist()], dtype=torch.float64)


def perturbation_curves(classify, pixels: Tensor, maps: Tensor, label: Tensor, counts: list[int],
                        direction: str, ties: str = "topk", clean_logits: Tensor | None = None,
                        fractions: list[float] | None = None) -> Curves:
    """Curves of a batch. ``classify``: [0,1] pixels (N,3,H,W) → logits (N,C); ``maps`` (B,H,W) at
    the input size (:func:`reference_maps`); ``label`` (B,) the class each hit is counted against;
    ``counts`` the pixels removed per step (:func:`removal_counts`), ``fractions`` their x
    (:func:`removal_fractions`; None: k/(H·W)). Every step's images are classified in one call."""
    if direction not in DIRECTIONS:
        raise ClipXaiError(f"study.direction={direction!r} is not known", "use study.direction=positive or negative")
    clean = classify(pixels) if clean_logits is None else clean_logits
    if ties == "topk":  # the reference calls topk with each k: on ties a larger k need not extend a smaller one
        index = [removal_order(maps, k, direction, ties) for k in counts]
    else:
        order = removal_order(maps, max(counts), direction, ties)
        index = [order[:, :k] for k in counts]
    removed = [remove_pixels(pixels, i) for i in index]
    logits = classify(torch.cat(removed)).view(len(counts), pixels.shape[0], -1)
    label = label.to(clean.device)
    points = [point_scores(clean, label, clean)] + [point_scores(lg, label, clean) for lg in logits]
    values = {name: torch.stack([p[name] for p in points], 1).double().cpu() for name in CURVES}
    n = pixels.shape[-2] * pixels.shape[-1]
    return Curves([0.0] + (list(fractions) if fractions is not None else [k / n for k in counts]), values)
