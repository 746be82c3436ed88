"""One-step FGSM on image–text cosine similarity (the thesis's perturbation, METHODS.md §3.1).

``space: pixel`` (default): x' = clamp(x + ε·sign(∇ₓ cos(f_I(x), f_T)), 0, 1) on the [0,1]
pixels x, before CLIP normalisation; the pixel change is at most ε.

``space: normalized`` reproduces the thesis's code, which stepped and clamped the CLIP-normalised
tensor z = (x − mean)/std: z' = clamp(z + ε·sign(∇_z cos), 0, 1), x' = z'·std + mean. Its step is
ε·std ≈ 0.27ε in pixels (std = 0.26–0.28 per channel), i.e. about 3.7× *smaller* than the same ε
in pixel space, and its clamp of z to [0,1] moves every value outside [mean, mean + std] onto that
range (most of an ordinary photo; docs/parity.md gives the measured share), a change far larger than
the step itself.

``direction: decrease`` gives the twin that lowers similarity. Whether the perturbation flips a
prediction is not checked: CLIP similarity has no single label to flip, and the thesis did not
check it either.
"""
from __future__ import annotations

from torch import Tensor

from clip_xai.explainers.base import text_target
from clip_xai.models.base import ClipAdapter
from clip_xai.perturbations.base import (
    DIRECTIONS, Perturbation, Perturbed, Space, box, check_direction,
)
from clip_xai.types import TextTokens


class FGSM(Perturbation):
    """Sign-gradient step of size ``eps`` (in units of ``space``) that raises (or lowers) similarity."""

    def __init__(self, eps: float, direction: str = "increase", space: str = "pixel", classes="auto",
                 prompt: str = "a photo of a {}", name: str = "fgsm"):
        super().__init__(name, eps, space, classes, prompt)
        check_direction(direction)
        self.direction = direction

    def perturb(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor,
                masks: Tensor | None = None) -> Perturbed:
        space = Space(self.space, model)
        z = space.to_space(pixels)
        stepped = z  # ε = 0: no step, but the normalized space still clamps, as the thesis did
        if self.eps > 0.0:
            g, _ = space.gradient(model, z, text_target(model, tokens))
            stepped = z + DIRECTIONS[self.direction] * self.eps * g.sign()
        # The box alone, not project's ball: a step of exactly ±ε never leaves the ball around z.
        boxed, clamped = box(stepped)
        return Perturbed(space.to_pixels(boxed).detach(), clamped)
