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

from clip_xai.config import sample_seed
from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import SampleRng, cosine
from clip_xai.models.base import ClipAdapter
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
    objective: Tensor | None = None  # map_attack: the objective at the returned image


class Space:
    """Pixel or CLIP-normalised coordinates (see the module docstring); the box is [0,1] in both."""

    def __init__(self, kind: str, model: ClipAdapter):
        self.kind = kind
        self.mean, self.std = model.vision.mean, model.vision.std

    def to_space(self, pixels: Tensor) -> Tensor:
        return pixels if self.kind == "pixel" else (pixels - self.mean) / self.std

    def to_pixels(self, z: Tensor) -> Tensor:
        return z if self.kind == "pixel" else z * self.std + self.mean


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
    """Base: name, ε, space; ``perturb`` does the work, ``__call__`` returns the pixels only."""

    def __init__(self, name: str, eps: float, space: str = "pixel"):
        check_common(eps, space)
        self.name = name
        self.eps = float(eps)
        self.space = space

    @property
    def label(self) -> str:
        """The ``perturbation`` column of the rows (the report groups by it)."""
        return self.name

    @property
    def linf_bound(self) -> float | None:
        """The largest pixel change this perturbation may make (None: unbounded, normalized space)."""
        return self.eps if self.space == "pixel" else None

    def params(self) -> dict:
        """Every setting, for the ``perturbation_params`` column (JSON)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, (int, float, str, bool, type(None)))}

    def params_json(self) -> str:
        return json.dumps(self.params(), sort_keys=True)

    def bind(self, explainer, model: ClipAdapter) -> None:
        """Called by the study with the run's explainer and model before any work (attacks on maps check them)."""

    def perturb(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Perturbed:
        raise NotImplementedError

    def __call__(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor | None = None) -> Tensor:
        if seeds is None:
            seeds = torch.zeros(pixels.shape[0], dtype=torch.long)
        return self.perturb(model, pixels, tokens, seeds).pixels


def perturbation_rng(seeds: Tensor, device: torch.device) -> SampleRng:
    """Per-sample generators for a perturbation's noise, from the sample seeds salted with
    "perturbation" so they never replay the explainer's own noise (RISE masks, bottleneck noise)."""
    return SampleRng([sample_seed(int(s), "perturbation") for s in seeds], device)


def uniform(rng: SampleRng, shape: tuple[int, ...]) -> Tensor:
    """(B, *shape) draws from U[0,1), row b from sample b's generator."""
    return torch.stack([torch.rand(shape, generator=g, device=rng.device) for g in rng.gens])


def similarity_gradient(model: ClipAdapter, space: Space, z: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(∂cos(f_I(x(z)), target)/∂z, cos) per sample, for z in the perturbation's space."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        s = cosine(model.vision(space.to_pixels(z))[0], target)
        (g,) = torch.autograd.grad(s.sum(), [z])
    return g, s.detach()


def project(z: Tensor, z0: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Onto the L∞ ball of radius ``eps`` around ``z0``, then the box [0,1]: (z, share clamped by the box)."""
    inside = torch.minimum(torch.maximum(z, z0 - eps), z0 + eps)
    boxed = inside.clamp(0.0, 1.0)
    return boxed, clamped_share(inside, boxed)


def clamped_share(before: Tensor, after: Tensor) -> Tensor:
    """(B,) share of values the box clamp changed."""
    return (before != after).flatten(1).float().mean(1)


def achieved_linf(clean: Tensor, perturbed: Tensor) -> Tensor:
    """(B,) achieved L∞ change in [0,1] pixel units."""
    return (perturbed.float() - clean.float()).abs().flatten(1).amax(1)
