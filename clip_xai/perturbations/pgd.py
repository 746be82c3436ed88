"""Projected gradient descent (PGD) on image–text cosine similarity, L∞ ball.

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018. Each of
``steps`` iterations takes a sign-gradient step of size ``alpha`` (default 2.5·ε/steps, Madry et
al.'s choice) that raises (``direction: increase``) or lowers the cosine similarity, then projects
onto the L∞ ball of radius ε around the clean image and onto the box [0,1], both in ``space``
(see :mod:`clip_xai.perturbations.base`). ``random_start`` begins at a uniform draw in the ball,
seeded per sample. The last iterate is returned.

One step without a random start is FGSM exactly: the step 2.5·ε is cut back to ε by the ball, and
x ± ε is the same float as FGSM's (the tests check it bit for bit).
"""
from __future__ import annotations

from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import text_target
from clip_xai.models.base import ClipAdapter
from clip_xai.perturbations.base import (
    DIRECTIONS, Perturbation, Perturbed, Space, box, check_direction, clamped_share, perturbation_rng, project,
    uniform,
)
from clip_xai.progress import steps
from clip_xai.types import TextTokens


def check_steps(steps: int, alpha: float | None) -> None:
    """One clear error for a step count or step size an iterative attack cannot take."""
    if int(steps) < 1:
        raise ClipXaiError(f"perturbation.steps={steps} must be at least 1", "use e.g. perturbation.steps=10")
    if alpha is not None and not float(alpha) > 0:
        raise ClipXaiError(f"perturbation.alpha={alpha} must be positive",
                           "use perturbation.alpha=null for 2.5·eps/steps, or a positive step size")


def random_start(z: Tensor, eps: float, seeds: Tensor) -> Tensor:
    """A uniform draw in the L∞ ball of radius ``eps`` around ``z``, seeded per sample (unclamped)."""
    u = uniform(perturbation_rng(seeds, z.device), tuple(z.shape[1:])).to(z.dtype)
    return z + (2.0 * u - 1.0) * eps


class PGD(Perturbation):
    """``steps`` projected sign-gradient steps of size ``alpha`` inside the ε ball (see module docstring)."""

    def __init__(self, eps: float, steps: int = 10, alpha: float | None = None, random_start: bool = False,
                 direction: str = "increase", space: str = "pixel", classes="auto", prompt: str = "a photo of a {}",
                 name: str = "pgd"):
        super().__init__(name, eps, space, classes, prompt)
        check_direction(direction)
        check_steps(steps, alpha)
        self.steps = int(steps)
        self.alpha = 2.5 * self.eps / self.steps if alpha is None else float(alpha)
        self.random_start = bool(random_start)
        self.direction = direction

    def perturb(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor,
                masks: Tensor | None = None) -> Perturbed:
        space = Space(self.space, model)
        z0 = space.to_space(pixels)
        if self.eps == 0.0:  # the box alone (the ball of radius 0 would be the identity before it)
            boxed, clamped = box(z0)
            return Perturbed(space.to_pixels(boxed), clamped)
        target = text_target(model, tokens)
        z, clamped = z0, clamped_share(z0, z0)
        if self.random_start:
            z, clamped = project(random_start(z0, self.eps, seeds), z0, self.eps)
        sign = DIRECTIONS[self.direction]
        for _ in steps(self.steps, "pgd", samples=z.shape[0]):  # progress with the job's ETA
            g, _ = space.gradient(model, z, target)
            z, clamped = project(z + sign * self.alpha * g.sign(), z0, self.eps)
        return Perturbed(space.to_pixels(z).detach(), clamped)
