"""X-Shift: move the explanation to a chosen region while CLIP's prediction stays put.

Babadi & Karimipour, "Right Predictions, Misleading Explanations: On the Vulnerability of
Vision-Language Model Explanations", ICML 2026 (arXiv 2605.16651). Written from the paper's public
description (abstract, OpenReview TL;DR): a grey-box attack that perturbs the image so that the
patch-level representations of a chosen region move toward the text embedding, under an
imperceptible budget, while the prediction is kept; the explanation maps of many methods follow the
patches. The paper's full method text and code were not available here, so every detail below
that the description leaves open is a choice of this module, named as such.

**Representations** (paper). The final-layer patch tokens projected into the joint space by the
tower's own head (``project_tokens``: ``ln_post`` and ``proj``, the dense embeddings MaskCLIP and
CLIP Surgery read), compared with the unit text embedding t by cosine: c_p(x) = cos(e_p(x), t) per
patch p. The attack never calls the explainer, so it runs for every method, and every method of a
run sees the same perturbed image (choice: the target is chosen from c(x₀), the attacker's own
clean map, not from the explained method's map; that keeps the attack grey-box and the images
paired across methods).

**Regions** on the patch grid (choice), from the clean image x₀:

* ``target: farthest``: the square box of ``region`` × the patch count whose centre is farthest
  (Euclidean, on the grid) from the peak patch of c(x₀) (first in raster order on ties);
* ``target: random_box``: a box of the same size at a position drawn from the sample's seed
  (salted ``xshift``);
* ``target: mask_complement``: the patches that lie mostly (≥ half their pixels) outside the
  dataset's object mask; needs a dataset with masks (RIVAL10).

The *object* O is the object mask's patches for ``mask_complement``; otherwise the |T| patches
with the highest c(x₀) outside the target T.

**Loss** (paper's direction; the form is a choice): L(x) = mean_{p∈T} c_p(x) − mean_{p∈O} c_p(x),
raised by PGD under an L∞ ball of radius ε in [0,1] pixels. **Prediction preservation**: with
s = cos(f_I(x), t) and Δs = s − s(x₀), each step ascends L − λ·(Δs/δ)² (δ = ``max_sim_change``)
by a sign step α·sign(∇) with its component along ∇s removed (first-order no change of s, as the
map attack does), then projects onto the ball and the box. Every iterate, x₀ included, is scored
in the same forward; the image returned is the one with the largest gain L(x) − L(x₀) among those
with |Δs| ≤ δ and, when a class-prompt set is given, the same zero-shot top-1 as x₀ (x₀ itself
when none is). So the bound and the kept prediction hold on every returned row by construction;
the study recomputes both independently from its own forward.

**Sparse variant** (``sparsity``; the paper's summary calls its perturbations sparse without a
definition available here, so this is a choice): only the ``sparsity`` share of pixel positions
may change, all three channels, chosen per sample as the positions with the largest |∇L| (summed
over channels) at x₀ and fixed for all steps; the L∞ budget applies to them.

The row's ``objective`` is the gain L(x') − L(x₀) at the returned image; ``region`` is the target
at image resolution (the study records the map's mass inside it before and after).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import text_target
from clip_xai.models.base import ClipAdapter
from clip_xai.perturbations.base import (
    Perturbation, Perturbed, clamped_share, orthogonal_to, perturbation_rng, project,
)
from clip_xai.progress import steps as progress_steps
from clip_xai.types import TextTokens

TARGETS = ("farthest", "random_box", "mask_complement")


def patch_similarity(model: ClipAdapter, pixels: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One vision forward: (c (B,h,w) cosine of each projected final-layer patch token with the unit
    text embedding, the image–text cosine s (B,), the unit image embedding (B,E))."""
    tower = model.vision
    x, bias = tower.embed(pixels)
    x, _ = tower.run(x, bias)
    dense = F.normalize(tower.project_tokens(x), dim=-1)  # (B,N,E)
    c = model.patch_map((dense * target[:, None, :]).sum(-1))
    image = F.normalize(tower.pool(x, pixels), dim=-1)
    return c, (image * target).sum(-1), image


def box_side(grid: tuple[int, int], region: float) -> tuple[int, int]:
    """(rows, cols) of the square-ish box covering ``region`` of the grid (at least one patch)."""
    r = math.sqrt(region)
    return max(1, round(r * grid[0])), max(1, round(r * grid[1]))


def box_mask(grid: tuple[int, int], side: tuple[int, int], top: Tensor, left: Tensor) -> Tensor:
    """(B,h,w) bool: the box of ``side`` at each sample's (top, left)."""
    rows = torch.arange(grid[0], device=top.device)[None, :, None]
    cols = torch.arange(grid[1], device=top.device)[None, None, :]
    t, l = top[:, None, None], left[:, None, None]
    return (rows >= t) & (rows < t + side[0]) & (cols >= l) & (cols < l + side[1])


def farthest_box(c: Tensor, side: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(top, left) of the box whose centre is farthest from each map's peak patch (first on ties)."""
    h, w = c.shape[-2:]
    peak = c.flatten(1).argmax(1)
    pr, pc = (peak // w).float(), (peak % w).float()
    tops = torch.arange(h - side[0] + 1, device=c.device).float()
    lefts = torch.arange(w - side[1] + 1, device=c.device).float()
    cr = tops + (side[0] - 1) / 2
    cc = lefts + (side[1] - 1) / 2
    d = (cr[None, :, None] - pr[:, None, None]) ** 2 + (cc[None, None, :] - pc[:, None, None]) ** 2  # (B,nt,nl)
    best = d.flatten(1).argmax(1)
    return best // len(lefts), best % len(lefts)


def random_box(seeds: Tensor, grid: tuple[int, int], side: tuple[int, int], device) -> tuple[Tensor, Tensor]:
    """(top, left) drawn uniformly per sample from its seed, salted ``xshift``."""
    rng = perturbation_rng(seeds, device, salt="xshift")
    pos = torch.stack([torch.stack([torch.randint(grid[0] - side[0] + 1, (), generator=g, device=device),
                                    torch.randint(grid[1] - side[1] + 1, (), generator=g, device=device)])
                       for g in rng.gens])
    return pos[:, 0], pos[:, 1]


def mask_patches(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B,H,W) bool object masks → (B,h,w) bool: patches with at least half their pixels on the object."""
    share = F.adaptive_avg_pool2d(masks[:, None].float(), grid)[:, 0]
    return share >= 0.5


def top_outside(c: Tensor, outside: Tensor, n: Tensor) -> Tensor:
    """(B,h,w) bool: per sample the n[b] highest patches of ``c`` outside ``outside``."""
    flat = c.flatten(1).masked_fill(outside.flatten(1), float("-inf"))
    order = flat.argsort(1, descending=True).argsort(1)  # rank of each patch
    keep = (order < n[:, None]) & torch.isfinite(flat)
    return keep.view_as(c)


def region_mean(c: Tensor, region: Tensor) -> Tensor:
    """(B,) mean of ``c`` over ``region`` (0 where the region is empty)."""
    r = region.flatten(1).to(c.dtype)
    return (c.flatten(1) * r).sum(1) / r.sum(1).clamp_min(1.0)


def upsample_region(region: Tensor, size: tuple[int, int]) -> Tensor:
    """(B,h,w) bool patch region → (B,H,W) bool pixels (each patch covers its pixels)."""
    return F.interpolate(region[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5


class XShift(Perturbation):
    """PGD that moves the target region's patch embeddings toward the text, prediction kept (module docstring)."""

    def __init__(self, eps: float, steps: int = 10, alpha: float | None = None, target: str = "farthest",
                 region: float = 0.25, sparsity: float | None = None, lam: float = 1.0,
                 max_sim_change: float = 0.01, classes="auto", prompt: str = "a photo of a {}", name: str = "xshift"):
        super().__init__(name, eps, "pixel", classes=classes, prompt=prompt)
        if int(steps) < 0:
            raise ClipXaiError(f"perturbation.steps={steps} is negative", "use perturbation.steps>=0 (0: the clean image)")
        if alpha is not None and not float(alpha) > 0:
            raise ClipXaiError(f"perturbation.alpha={alpha} must be positive",
                               "use perturbation.alpha=null for 2.5·eps/steps, or a positive step size")
        if target not in TARGETS:
            raise ClipXaiError(f"perturbation.target={target!r} is not known", f"use one of: {', '.join(TARGETS)}")
        if not 0.0 < float(region) < 1.0:
            raise ClipXaiError(f"perturbation.region={region} is outside (0, 1)",
                               "use the target box's share of the patches, e.g. perturbation.region=0.25")
        if sparsity is not None and not 0.0 < float(sparsity) <= 1.0:
            raise ClipXaiError(f"perturbation.sparsity={sparsity} is outside (0, 1]",
                               "use perturbation.sparsity=null (dense) or the share of pixels that may change, e.g. 0.1")
        if not float(max_sim_change) > 0:
            raise ClipXaiError(f"perturbation.max_sim_change={max_sim_change} must be positive",
                               "set perturbation.max_sim_change above 0, e.g. 0.01")
        if float(lam) < 0:
            raise ClipXaiError(f"perturbation.lam={lam} is negative", "use perturbation.lam>=0 (0: no penalty)")
        self.steps = int(steps)
        self.alpha = 2.5 * self.eps / max(self.steps, 1) if alpha is None else float(alpha)
        self.target = target
        self.region = float(region)
        self.sparsity = None if sparsity is None else float(sparsity)
        self.lam = float(lam)
        self.max_sim_change = float(max_sim_change)

    def bind(self, explainer, model: ClipAdapter) -> None:
        """The attack needs the per-patch head and a patch grid of the vision tower, not the explainer."""
        if "token_head" not in model.vision.provides:
            raise ClipXaiError(f"perturbation=xshift needs per-patch embeddings in the joint space, and model "
                               f"{model.name} has none ({model.vision.missing['token_head']})",
                               "use a class-token ViT CLIP (e.g. model=vit_b16 or model=tiny)")
        _ = model.grid  # one clear error for an image tower without patches

    def bind_data(self, dataset) -> None:
        super().bind_data(dataset)
        if self.target == "mask_complement" and not getattr(dataset, "has_masks", False):
            raise ClipXaiError(f"perturbation.target=mask_complement needs object masks, and dataset "
                               f"{type(dataset).__name__} has none",
                               "use dataset=rival10, or perturbation.target=farthest|random_box")

    def regions(self, c0: Tensor, seeds: Tensor, masks: Tensor | None) -> tuple[Tensor, Tensor]:
        """(target T, object O) as (B,h,w) bool patch masks, from the clean map ``c0`` (module docstring)."""
        grid = tuple(c0.shape[-2:])
        if self.target == "mask_complement":
            if masks is None:
                raise ClipXaiError("perturbation.target=mask_complement got a batch without object masks",
                                   "use dataset=rival10, or perturbation.target=farthest|random_box")
            obj = mask_patches(masks.to(c0.device), grid)
            return ~obj, obj
        side = box_side(grid, self.region)
        if self.target == "farthest":
            top, left = farthest_box(c0, side)
        else:
            top, left = random_box(seeds, grid, side, c0.device)
        target = box_mask(grid, side, top, left)
        return target, top_outside(c0, target, target.flatten(1).sum(1))

    def perturb(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor,
                masks: Tensor | None = None) -> Perturbed:
        text = text_target(model, tokens)
        classes = self.class_embeddings(model)
        with torch.no_grad():
            c0, s0, image0 = patch_similarity(model, pixels, text)
        top0 = None if classes is None else (image0.float() @ classes.T).argmax(1)
        target, obj = self.regions(c0.float(), seeds, masks)
        loss0 = region_mean(c0, target) - region_mean(c0, obj)
        best, best_gain = pixels.clone(), torch.zeros_like(s0)
        best_clamped = torch.zeros_like(s0)
        x, clamped, support = pixels, clamped_share(pixels, pixels), None
        stepping_at_all = self.steps > 0 and self.eps > 0
        for t in progress_steps(self.steps + 1 if stepping_at_all else 1, "xshift", samples=pixels.shape[0]):
            stepping = stepping_at_all and t < self.steps
            gain, ds, top1, g_loss, g_sim = self._score(model, x, text, classes, target, obj, loss0, s0, stepping)
            ok = (ds.abs() <= self.max_sim_change) & (gain > best_gain)
            if top0 is not None:
                ok &= top1 == top0
            best = torch.where(ok[:, None, None, None], x, best)
            best_gain, best_clamped = torch.where(ok, gain, best_gain), torch.where(ok, clamped, best_clamped)
            if not stepping:
                break
            g = g_loss - (2.0 * self.lam / self.max_sim_change ** 2) * ds.view(-1, 1, 1, 1) * g_sim
            if self.sparsity is not None and support is None:
                support = self._support(g_loss)
            step, direction = self.alpha * g.nan_to_num(0.0).sign(), g_sim.nan_to_num(0.0)
            if support is not None:  # both on the support: the step off ∇s stays there
                step, direction = step * support, direction * support
            step = orthogonal_to(step, direction)
            x, clamped = project(x + step, pixels, self.eps)
        region = upsample_region(target, tuple(pixels.shape[-2:]))
        return Perturbed(best.detach(), best_clamped, best_gain, region=region)

    def _score(self, model, x, text, classes, target, obj, loss0, s0, with_grad: bool):
        """(gain L(x) − L(x₀), Δs, top-1 or None, ∇L, ∇s) of candidate ``x`` in one forward (gradients
        only when ``with_grad``)."""
        with torch.enable_grad() if with_grad else torch.no_grad():
            xg = x.detach().requires_grad_(with_grad)
            c, s, image = patch_similarity(model, xg, text)
            loss = region_mean(c, target) - region_mean(c, obj)
            g_loss = g_sim = None
            if with_grad:
                (g_loss,) = torch.autograd.grad(loss.sum(), [xg], retain_graph=True)
                (g_sim,) = torch.autograd.grad(s.sum(), [xg])
        top1 = None if classes is None else (image.detach().float() @ classes.T).argmax(1)
        return (loss - loss0).detach(), (s - s0).detach(), top1, g_loss, g_sim

    def _support(self, g: Tensor) -> Tensor:
        """(B,1,H,W) 0/1: the ``sparsity`` share of pixel positions with the largest |∇L| summed over channels."""
        score = g.abs().sum(1).flatten(1)
        k = max(1, round(self.sparsity * score.shape[1]))
        idx = score.topk(k, dim=1).indices
        sup = torch.zeros_like(score).scatter_(1, idx, 1.0)
        return sup.view(g.shape[0], 1, *g.shape[-2:])
