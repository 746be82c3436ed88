"""What every perturbation shares: its space, box and L∞ ball, its seeded noise, and what it reports.

A perturbation maps a batch of [0,1] pixels to perturbed [0,1] pixels. It works in one of two
spaces (``space``):

* ``pixel`` (default): steps, balls and the [0,1] clamp act on the [0,1] pixels, before the model
  normalises them; ``eps`` is in pixel units and the achieved L∞ change is at most ``eps``.
* ``normalized`` (the thesis's code): they act on the CLIP-normalised tensor z = (x − mean)/std,
  including the clamp of z to [0,1]; the result is mapped back with x = z·std + mean. A step of
  ``eps`` in z is ``eps·std`` ≈ 0.27·eps in pixels, but the clamp of z to [0,1] also moves every
  value whose z lies outside [0,1] (every pixel darker than the mean colour, or brighter than
  mean + std) onto that range, so the pixel change has no ``eps`` bound.

:meth:`Perturbation.perturb` returns a :class:`Perturbed`: the pixels plus what the study records
per row (the share of values the clamp changed, the objective of an attack on the map). Calling
the object returns the pixels alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import SampleRng, pixel_gradient
from clip_xai.models.base import ClipAdapter
from clip_xai.models.zeroshot import ZeroShotHead
from clip_xai.seeds import sample_seed
from clip_xai.types import TextTokens

SPACES = ("pixel", "normalized")
DIRECTIONS = {"increase": 1.0, "decrease": -1.0}
#: Slack of the L∞ check: x ± eps rounded to float32 may land one ulp (6e-8 near 1) beyond eps.
LINF_TOL = 1e-6


@dataclass
class Perturbed:
    """Perturbed [0,1] pixels (B,3,H,W) and per-sample records (B,) for the result rows."""

    pixels: Tensor
    clamped: Tensor  # share of values the final clamp to [0,1] (of the perturbation's space) changed
    objective: Tensor | None = None  # map_attack / xshift: the objective at the returned image
    region: Tensor | None = None  # xshift: (B,H,W) bool target region (the study records the map's mass there)


class Space:
    """Pixel or CLIP-normalised coordinates (see the module docstring); the box is [0,1] in both."""

    def __init__(self, kind: str, model: ClipAdapter):
        self.kind = kind
        self.mean, self.std = model.vision.mean, model.vision.std

    def to_space(self, pixels: Tensor) -> Tensor:
        return pixels if self.kind == "pixel" else (pixels - self.mean) / self.std

    def to_pixels(self, z: Tensor) -> Tensor:
        return z if self.kind == "pixel" else z * self.std + self.mean

    def gradient(self, model: ClipAdapter, z: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(∂cos(f_I(x(z)), target)/∂z, cos) per sample, for z in this space: the explainers'
        :func:`~clip_xai.explainers.base.pixel_gradient` at x(z), times ∂x/∂z (1, or ``std`` in the
        normalised space: the chain rule through x = z·std + mean)."""
        g, s = pixel_gradient(model, self.to_pixels(z.detach()), target)
        return (g if self.kind == "pixel" else g * self.std), s


def check_common(eps: float, space: str) -> None:
    """One clear error for an ε or space a perturbation cannot take."""
    if not 0.0 <= float(eps) <= 1.0:
        raise ClipXaiError(f"perturbation.eps={eps} is outside [0, 1] (it is in [0,1] units of the perturbation's space)",
                           "use e.g. perturbation.eps=0.0314 for 8/255")
    if space not in SPACES:
        raise ClipXaiError(f"perturbation.space={space!r} is not known",
                           "use perturbation.space=pixel (default) or normalized (the thesis's code)")


def check_direction(direction: str) -> None:
    """One clear error for an unknown ``direction``."""
    if direction not in DIRECTIONS:
        raise ClipXaiError(f"perturbation.direction={direction!r} is not known",
                           "use perturbation.direction=increase or decrease")


class Perturbation:
    """Base: name, ε, space, class prompts; ``perturb`` does the work, ``__call__`` returns the pixels only.

    ``classes`` is the zero-shot class-prompt set whose top-1 the study records as kept or not
    (``pred_kept``) and X-Shift keeps: ``auto`` = the dataset's class names where it has them
    (RIVAL10, ImageNet; none for captions-only sets), ``null`` = none, or a list of names; each is
    written into ``prompt``.
    """

    def __init__(self, name: str, eps: float, space: str = "pixel", classes="auto", prompt: str = "a photo of a {}"):
        check_common(eps, space)
        if not (classes is None or classes == "auto" or (not isinstance(classes, str) and len(list(classes)) >= 2)):
            raise ClipXaiError(f"perturbation.classes={classes!r} is not a class-prompt set",
                               "use perturbation.classes=auto (the dataset's class names), null, or a list of "
                               "at least two names, e.g. 'perturbation.classes=[cat,dog]'")
        if "{}" not in str(prompt):
            raise ClipXaiError(f"perturbation.prompt={prompt!r} has no {{}} for the class name",
                               "use e.g. perturbation.prompt='a photo of a {}'")
        self.name = name
        self.eps = float(eps)
        self.space = space
        self.classes = classes if classes is None or classes == "auto" else [str(c) for c in classes]
        self.prompt = str(prompt)
        self._class_names: list[str] | None = None if self.classes == "auto" else self.classes
        self._head: ZeroShotHead | None = None

    @property
    def label(self) -> str:
        """The ``perturbation`` column of the rows (the report groups by it)."""
        return self.name

    @property
    def linf_bound(self) -> float | None:
        """The largest pixel change this perturbation may make (None: unbounded, normalized space)."""
        return self.eps if self.space == "pixel" else None

    def params(self) -> dict:
        """Every setting, for the ``perturbation_params`` column (JSON); ``classes`` as resolved."""
        out = {k: v for k, v in vars(self).items()
               if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))}
        out["classes"] = self._class_names
        return out

    def params_json(self) -> str:
        return json.dumps(self.params(), sort_keys=True)

    def bind(self, explainer, model: ClipAdapter) -> None:
        """Called by the study with the run's explainer and model before any work (attacks on maps check them)."""

    def bind_data(self, dataset) -> None:
        """Called by the study with the run's dataset before any work: ``classes: auto`` takes its
        class names here (X-Shift also checks that it has object masks where it needs them)."""
        if self.classes == "auto":
            names = getattr(dataset, "classnames", None)
            self._class_names = list(names) if names and len(names) >= 2 else None
        self._head = None

    def class_embeddings(self, model: ClipAdapter) -> Tensor | None:
        """(C,E) unit class embeddings of the class prompts (None without a class-prompt set): the
        weights of a :class:`~clip_xai.models.zeroshot.ZeroShotHead` with the one template ``prompt``,
        cached per model by the head."""
        if self._class_names is None:
            return None
        if self._head is None:
            self._head = ZeroShotHead(self._class_names, [self.prompt])
        return self._head.weights(model)

    def perturb(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor,
                masks: Tensor | None = None) -> Perturbed:
        """Perturb a batch; ``masks`` (B,H,W) bool are the dataset's object masks where it has them
        (only X-Shift's ``target: mask_complement`` reads them)."""
        raise NotImplementedError

    def __call__(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor | None = None,
                 masks: Tensor | None = None) -> Tensor:
        if seeds is None:
            seeds = torch.zeros(pixels.shape[0], dtype=torch.long)
        return self.perturb(model, pixels, tokens, seeds, masks).pixels


def perturbation_rng(seeds: Tensor, device: torch.device, salt: str = "perturbation") -> SampleRng:
    """Per-sample generators for a perturbation's noise, from the sample seeds salted with ``salt``
    ("perturbation" unless a perturbation names its own) so they never replay the explainer's own
    noise (RISE masks, bottleneck noise), nor, with distinct salts, each other's draws."""
    return SampleRng([sample_seed(int(s), salt) for s in seeds], device)


def uniform(rng: SampleRng, shape: tuple[int, ...]) -> Tensor:
    """(B, *shape) draws from U[0,1), row b from sample b's generator."""
    return torch.stack([torch.rand(shape, generator=g, device=rng.device) for g in rng.gens])


def box(z: Tensor) -> tuple[Tensor, Tensor]:
    """Onto the box [0,1] of the perturbation's space: (z clamped, (B,) share of values the clamp changed).
    FGSM and the noise controls end here; :func:`project` ends here after its ball."""
    boxed = z.clamp(0.0, 1.0)
    return boxed, clamped_share(z, boxed)


def project(z: Tensor, z0: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Onto the L∞ ball of radius ``eps`` around ``z0``, then the box [0,1]: (z, share clamped by the box)."""
    return box(torch.minimum(torch.maximum(z, z0 - eps), z0 + eps))


def orthogonal_to(step: Tensor, direction: Tensor) -> Tensor:
    """``step`` minus its component along ``direction``, per sample: a first-order no-change step
    (the map attack and X-Shift remove the similarity gradient's direction from their steps)."""
    coef = (step * direction).flatten(1).sum(1) / direction.flatten(1).square().sum(1).clamp_min(1e-12)
    return step - coef.view(-1, *([1] * (step.dim() - 1))) * direction


def clamped_share(before: Tensor, after: Tensor) -> Tensor:
    """(B,) share of values the box clamp changed."""
    return (before != after).flatten(1).float().mean(1)


def achieved_linf(clean: Tensor, perturbed: Tensor) -> Tensor:
    """(B,) achieved L∞ change in [0,1] pixel units."""
    return (perturbed.float() - clean.float()).abs().flatten(1).amax(1)


def mass_inside(maps: Tensor, region: Tensor) -> Tensor:
    """(B,) share of each non-negative (B,H,W) map's mass inside the (B,H,W) bool ``region`` (NaN for
    an all-zero map, e.g. a flagged constant one)."""
    m = maps.float().flatten(1)
    return (m * region.flatten(1).to(m.dtype)).sum(1) / m.sum(1)
