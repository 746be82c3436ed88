"""An attack on the explanation itself: move the map as far as possible while CLIP's output stays put.

Ghorbani, Abid & Zou, "Interpretation of Neural Networks is Fragile", AAAI 2019; Dombrowski et
al., "Explanations can be manipulated and geometry is to blame", NeurIPS 2019. Written from the
papers' descriptions.

Maps are compared as distributions: the raw map minus its minimum, upsampled bilinearly to the
image size, divided by its sum (the min-max normalisation of the metrics followed by a sum to 1;
the span cancels). With p₀ the clean image's and p the candidate's, the ``objective`` D is

* ``topk`` (Ghorbani's top-k attack): the mass of p₀'s top-``k`` pixels that p no longer puts
  there, D = Σ_{i∈T₀} (p₀ − p)_i, in [−1, 1];
* ``distance`` (Dombrowski's map distance, untargeted): D = ‖p − p₀‖₂ / ‖p₀‖₂. Its gradient is zero
  at the clean image, so it needs ``random_start``.

PGD on L = D − λ·(Δs/δ)², with Δs = s − s₀ the change of the image–text cosine (``sim_pert −
sim_orig`` of the rows) and δ = ``max_sim_change``: each step is the sign step α·sign(∇L) (α
default 2.5·ε/steps) with its component along ∇s removed (so it leaves s unchanged to first
order; CLIP's similarity is far more sensitive to pixels than its maps, and sign steps alone
overshoot any useful δ), then projected onto the L∞ ball of radius ε and the box [0,1]. It starts
from a seeded uniform draw in the ball (``random_start``) or the clean image. Every iterate, the
start included, is scored on the unmodified model; the returned image is the one with the largest
D among those with |Δs| ≤ δ (the clean image, D = 0, when none is), so |sim_pert − sim_orig| stays
within δ on every row. The bound is on the cosine itself, not relative to it: on a random-weight
model s₀ is near 0 and a relative bound would forbid almost any change. The row's ``objective`` is
D at the returned image.

D needs the map's gradient with respect to the pixels: double backpropagation through the
explainer (explainers declare it with ``differentiable = True``; see
:func:`clip_xai.explainers.base.keep_graph`). CLIP's GELU activations are already smooth, so its
second derivatives are informative as they are; ``softplus_beta`` swaps the vision tower's
ReLU/GELU-family activations for softplus(β·x)/β while the gradient is taken, as Dombrowski et al.
do for ReLU networks (restored right after; scoring uses the real model). An explainer without
differentiable maps fails at start-up unless ``surrogate`` names one whose map is attacked instead
(a transfer attack: the run's explainer is only measured).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import cosine, keep_graph, text_target
from clip_xai.models.base import ClipAdapter
from clip_xai.perturbations.base import Perturbation, Perturbed, clamped_share, orthogonal_to, project
from clip_xai.perturbations.pgd import check_steps, random_start
from clip_xai.progress import steps
from clip_xai.types import TextTokens

OBJECTIVES = ("topk", "distance")
EPS = 1e-12
#: Activation modules softplus_beta replaces (by class name: open_clip, torch and HF transformers).
SMOOTHED = {"ReLU", "GELU", "QuickGELU", "GELUActivation", "QuickGELUActivation", "NewGELUActivation",
            "FastGELUActivation", "GELUTanh", "PytorchGELUTanh"}


@contextlib.contextmanager
def softplus_activations(module: nn.Module, beta: float | None):
    """Within: every ReLU/GELU-family activation module under ``module`` is softplus(β·x)/β; the
    originals are put back on exit (also on error). ``beta=None``: nothing changes."""
    if beta is None:
        yield
        return
    swapped = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if type(child).__name__ in SMOOTHED]
    if not swapped:
        raise ClipXaiError("perturbation.softplus_beta is set but the vision tower has no ReLU/GELU activation modules",
                           "use perturbation.softplus_beta=null for this model")
    try:
        for parent, name, _ in swapped:
            setattr(parent, name, nn.Softplus(beta=beta))
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def mass_map(raw: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) raw maps → (B, H·W) distributions: minus the minimum, bilinear to ``size``, sum 1."""
    m = raw.float()
    m = m - m.flatten(1).amin(1)[:, None, None]
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    m = m.flatten(1)
    return m / m.sum(1, keepdim=True).clamp_min(EPS)


def build_surrogate(name: str, model: ClipAdapter):
    """The explainer ``conf/explainer/<name>.yaml`` with its defaults, checked for differentiable maps."""
    from omegaconf import OmegaConf

    from clip_xai.paths import CONF_DIR
    from clip_xai.config import build, group_option

    try:
        node = group_option(CONF_DIR, "explainer", name)
    except FileNotFoundError:
        raise ClipXaiError(f"perturbation.surrogate={name!r} is not an explainer (no conf/explainer/{name}.yaml)",
                           f"use one of: {', '.join(differentiable_explainers())}") from None
    explainer = build(OmegaConf.create({"explainer": node}), "explainer")
    if not explainer.differentiable:
        raise ClipXaiError(f"perturbation.surrogate={name} has no map differentiable with respect to the pixels",
                           f"use one of: {', '.join(differentiable_explainers())}")
    explainer.check_model(model)
    return explainer


def differentiable_explainers() -> list[str]:
    """Names of the explainer configs whose maps map_attack can differentiate."""
    from pathlib import Path

    from hydra.utils import get_class

    from clip_xai.paths import CONF_DIR
    from clip_xai.config import group_option

    names = []
    for path in sorted(Path(CONF_DIR, "explainer").glob("*.yaml")):
        if getattr(get_class(group_option(CONF_DIR, "explainer", path.stem)["_target_"]), "differentiable", False):
            names.append(path.stem)
    return names


class MapAttack(Perturbation):
    """PGD that maximises the change of the map under an L∞ budget with |Δs| bounded (module docstring)."""

    def __init__(self, eps: float, steps: int = 10, alpha: float | None = None, objective: str = "topk",
                 k: int = 100, lam: float = 1.0, max_sim_change: float = 0.01, random_start: bool = True,
                 softplus_beta: float | None = None, surrogate: str | None = None, classes="auto",
                 prompt: str = "a photo of a {}", name: str = "map_attack"):
        super().__init__(name, eps, "pixel", classes, prompt)
        check_steps(steps, alpha)
        if objective not in OBJECTIVES:
            raise ClipXaiError(f"perturbation.objective={objective!r} is not known",
                               "use perturbation.objective=topk (Ghorbani) or distance (Dombrowski)")
        if objective == "distance" and not random_start:
            raise ClipXaiError("perturbation.objective=distance has a zero gradient at the clean image",
                               "keep perturbation.random_start=true with objective=distance")
        for key, value in (("k", k), ("max_sim_change", max_sim_change)):
            if not float(value) > 0:
                raise ClipXaiError(f"perturbation.{key}={value} must be positive", f"set perturbation.{key} above 0")
        if float(lam) < 0:
            raise ClipXaiError(f"perturbation.lam={lam} is negative", "use perturbation.lam>=0 (0: no penalty)")
        if softplus_beta is not None and not float(softplus_beta) > 0:
            raise ClipXaiError(f"perturbation.softplus_beta={softplus_beta} must be positive",
                               "use perturbation.softplus_beta=null (model as is) or e.g. 10")
        self.steps = int(steps)
        self.alpha = 2.5 * self.eps / self.steps if alpha is None else float(alpha)
        self.objective = objective
        self.k = int(k)
        self.lam = float(lam)
        self.max_sim_change = float(max_sim_change)
        self.random_start = bool(random_start)
        self.softplus_beta = None if softplus_beta is None else float(softplus_beta)
        self.surrogate = surrogate
        self.explainer = None

    @property
    def label(self) -> str:
        return self.name if self.surrogate is None else f"{self.name}({self.surrogate})"

    def bind(self, explainer, model: ClipAdapter) -> None:
        """Attack ``explainer``'s map, or the surrogate's; one clear error when neither can be differentiated."""
        if self.surrogate is not None:
            self.explainer = build_surrogate(self.surrogate, model)
            return
        if not getattr(explainer, "differentiable", False):
            raise ClipXaiError(
                f"perturbation=map_attack needs the gradient of the map with respect to the pixels, and "
                f"explainer {explainer.name} has none (it is iterative or sampled)",
                f"attack a differentiable explainer ({', '.join(differentiable_explainers())}), or add "
                f"perturbation.surrogate=gradcam for a transfer attack (gradcam's map is attacked, "
                f"{explainer.name}'s is measured)")
        self.explainer = explainer

    def _objective(self, p: Tensor, p0: Tensor, top: Tensor | None) -> Tensor:
        if self.objective == "topk":
            return (p0.gather(1, top) - p.gather(1, top)).sum(1)
        return (p - p0).norm(dim=1) / p0.norm(dim=1).clamp_min(EPS)

    def perturb(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor,
                masks: Tensor | None = None) -> Perturbed:
        if self.explainer is None:
            raise ClipXaiError("map_attack has no explainer to attack", "call bind(explainer, model) before perturbing")
        explainer, size = self.explainer, tuple(pixels.shape[-2:])
        n_pix = size[0] * size[1]
        if not 1 <= self.k <= n_pix:
            raise ClipXaiError(f"perturbation.k={self.k} is outside [1, {n_pix}] for {size[0]}x{size[1]} images",
                               f"use perturbation.k between 1 and {n_pix}")
        target = text_target(model, tokens)
        with torch.no_grad():
            s0 = cosine(model.vision(pixels)[0], target)
        p0 = mass_map(explainer(model, pixels, tokens, seeds), size)
        top = torch.topk(p0, self.k, dim=1).indices if self.objective == "topk" else None

        def score(x: Tensor, graph: bool) -> tuple[Tensor, Tensor]:
            """(D, Δs) of candidate ``x``: with a graph to ``x`` (explain) or plain (the detached call)."""
            m = explainer.explain(model, x, tokens, seeds) if graph else explainer(model, x, tokens, seeds)
            with contextlib.nullcontext() if graph else torch.no_grad():
                s = cosine(model.vision(x)[0], target)
            return self._objective(mass_map(m, size), p0, top), s - s0

        x, clamped = pixels, clamped_share(pixels, pixels)
        if self.random_start and self.eps > 0:
            x, clamped = project(random_start(pixels, self.eps, seeds), pixels, self.eps)
        best, best_d, best_clamped = pixels.clone(), torch.zeros_like(s0), torch.zeros_like(s0)
        for t in steps(self.steps + 1, "map_attack", samples=pixels.shape[0]):  # progress with the job's ETA
            stepping = t < self.steps and self.eps > 0
            if stepping:
                d, ds, g, gs = self._gradients(model, score, x)
            if not stepping or self.softplus_beta is not None:
                d, ds = score(x, graph=False)  # the real model's values
            ok = (ds.abs() <= self.max_sim_change) & (d > best_d)
            best = torch.where(ok[:, None, None, None], x, best)
            best_d, best_clamped = torch.where(ok, d, best_d), torch.where(ok, clamped, best_clamped)
            if not stepping:
                break
            step = orthogonal_to(self.alpha * g.nan_to_num(0.0).sign(), gs.nan_to_num(0.0))
            x, clamped = project(x + step, pixels, self.eps)
        return Perturbed(best.detach(), best_clamped, best_d)

    def _gradients(self, model: ClipAdapter, score, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(D, Δs, ∇L, ∇Δs) at ``x`` by double backpropagation, L = D − λ·(Δs/δ)²."""
        xg = x.detach().requires_grad_(True)
        with keep_graph(), softplus_activations(model.vision, self.softplus_beta):
            d, ds = score(xg, graph=True)
            loss = d - self.lam * (ds / self.max_sim_change).square()
            (g,) = torch.autograd.grad(loss.sum(), [xg], retain_graph=True)
            (gs,) = torch.autograd.grad(ds.sum(), [xg])
        return d.detach(), ds.detach(), g, gs
