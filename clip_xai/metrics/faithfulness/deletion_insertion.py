"""Deletion and insertion curves as Grad-ECLIP evaluates them (Zhao et al. 2024; METHODS.md §3.5).

Followed from the reference scripts ``imagenet_eval_deletion.py`` / ``imagenet_eval_insertion.py``
of Cyang-Zhao/Grad-Eclip (read, not copied). On the uint8 image at its own size (short side capped
at ``max_side``, :func:`clip_xai.models.preprocess.cap_short_side`), the pixels are visited in order of decreasing map value
(:func:`pixel_order`), ``pixels_per_step(area, steps)`` per step; deletion overwrites them with
uniform random colours, insertion copies them onto a black canvas (:func:`curve_images`). Every
``eval_every`` steps the uint8 image is kept; the study re-preprocesses those images and scores
them with a zero-shot head (:func:`topk_hits`). Quirks of the reference reproduced here:

* colours are ``floor(U[0,1) · 255)`` (the float → uint8 cast of the reference truncates, so 255
  never occurs), drawn per step as ``(n, 3)`` from one CPU generator in the reference's order
  (the reference uses torch's global RNG unseeded; here a per-sample seeded generator);
* the order is ``numpy.argsort(-map)`` on the float32 map (numpy's default sort kind), so ties of
  an upsampled patch map are broken exactly as the reference breaks them;
* with ``max(1, …)`` pixels per step a tiny image can run out of pixels: later steps change nothing
  (the reference would crash there).

Nothing here knows about models: the functions take and return tensors.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.metrics.faithfulness.perturbation_curve import curve_auc as trapezoid

MODES = ("deletion", "insertion")
REPLACEMENTS = ("random", "black")  # what deletion writes (insertion always starts from black)
TOPK = (1, 5, 10)  # the schema's curve_top1/5/10 columns


def pixels_per_step(area: int, steps: int) -> int:
    """Pixels changed per step: ``max(1, int(area / (2·steps)))`` (the reference's ``pixel_once``),
    so ``steps`` steps reach at most half of the image."""
    return max(1, int(area / (2 * steps)))


def check_schedule(steps: int, eval_every: int) -> None:
    """One clear error for a step schedule the protocol cannot run (before any work)."""
    fix = "use study.steps=100 study.eval_every=10 (the reference's), or a steps that eval_every divides"
    if not (isinstance(steps, int) and steps >= 1) or not (isinstance(eval_every, int) and eval_every >= 1):
        raise ClipXaiError(f"deletion/insertion needs integer steps >= 1 and eval_every >= 1, got "
                           f"steps={steps!r}, eval_every={eval_every!r}", fix)
    if steps % eval_every:
        raise ClipXaiError(f"study.eval_every={eval_every} does not divide study.steps={steps}: the last "
                           f"{steps % eval_every} step(s) would never be evaluated", fix)


def pixel_order(heatmap: Tensor) -> Tensor:
    """(H·W,) flat pixel indices (row-major) by decreasing map value, ties as ``np.argsort(-map)``
    breaks them (the reference's order; a torch sort would order ties differently)."""
    flat = heatmap.detach().float().cpu().numpy().reshape(-1)
    return torch.from_numpy(np.argsort(-flat).astype(np.int64))


def colour_generator(seed: int) -> torch.Generator:
    """The CPU generator the deletion colours of one sample are drawn from."""
    return torch.Generator().manual_seed(int(seed))


def curve_images(image: Tensor, order: Tensor, mode: str, steps: int, eval_every: int,
                 generator: torch.Generator | None = None, replacement: str = "random") -> tuple[Tensor, list[int]]:
    """The uint8 images at the evaluated steps and the number of pixels changed at each.

    Args:
        image: (H, W, 3) uint8, the image at its own size.
        order: (H·W,) flat pixel indices, most important first (:func:`pixel_order`).
        mode: ``deletion`` (pixels replaced) or ``insertion`` (pixels copied onto a black canvas).
        replacement: deletion only: ``random`` colours from ``generator`` (the reference) or ``black``.
        steps, eval_every: the schedule (:func:`check_schedule`).

    Returns:
        ((steps // eval_every, H, W, 3) uint8 images after steps eval_every, 2·eval_every, …;
        the changed-pixel count after each of those steps).
    """
    if mode not in MODES:
        raise ClipXaiError(f"mode {mode!r} is not known", "use study.mode=deletion or insertion")
    check_schedule(steps, eval_every)
    if replacement not in REPLACEMENTS:
        raise ClipXaiError(f"replacement {replacement!r} is not known", "use study.replacement=random or black")
    random = mode == "deletion" and replacement == "random"
    if random and generator is None:
        raise ClipXaiError("deletion needs a seeded generator for its colours", "pass colour_generator(seed)")
    h, w, _ = image.shape
    flat = image.reshape(-1, 3)
    per = pixels_per_step(h * w, steps)
    work = flat.clone() if mode == "deletion" else torch.zeros_like(flat)
    order = order.to(flat.device)
    kept, counts = [], []
    for step in range(1, steps + 1):
        idx = order[(step - 1) * per: step * per]
        if random:
            work[idx] = (torch.rand(len(idx), 3, generator=generator) * 255.0).to(torch.uint8).to(work.device)
        elif mode == "deletion":
            work[idx] = 0
        else:
            work[idx] = flat[idx]
        if step % eval_every == 0:
            kept.append(work.view(h, w, 3).clone())
            counts.append(min(step * per, h * w))
    return torch.stack(kept), counts


def topk_hits(logits: Tensor, target: int, ks: Sequence[int]) -> Tensor:
    """(P, len(ks)) float64 1/0: is ``target`` among the top-k classes of each row (torch.topk's
    order, as the reference's ``accuracy``)."""
    top = logits.topk(max(ks), dim=1).indices
    hit = top == int(target)
    return torch.stack([hit[:, :k].any(1) for k in ks], dim=1).double().cpu()


def curve_auc(values: Sequence[float]) -> float:
    """Area under a curve of ``n`` points at unit spacing, divided by ``n - 1``: the trapezoid
    rule over the evaluated points with the x axis scaled to [0, 1] (RISE's deletion/insertion
    AUC; the Grad-ECLIP scripts print the points only). NaN for fewer than two points. The
    perturbation-curve trapezoid over evenly spaced x in [0, 1]."""
    y = np.asarray(values, dtype=np.float64)
    if y.size < 2:
        return float("nan")
    return trapezoid(np.linspace(0.0, 1.0, y.size), y)


__all__ = ["MODES", "REPLACEMENTS", "TOPK", "check_schedule", "colour_generator", "curve_auc", "curve_images",
           "pixel_order", "pixels_per_step", "topk_hits"]
