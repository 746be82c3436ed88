"""One-step FGSM on image–text cosine similarity (the thesis's perturbation, METHODS.md §3.1).

x' = clamp(x + ε·sign(∇ₓ cos(f_I(x), f_T)), 0, 1) with x the [0,1] pixels, i.e. the step and the
clamp act in pixel space before CLIP normalisation. Deviation from the reference code (which
stepped and clamped the *normalised* tensor, so its ε was ≈3.7× larger and negatives were
clipped) is deliberate and documented in the README. ``direction=decrease`` gives the twin that
lowers similarity. Whether the perturbation flips a prediction is not checked: CLIP similarity
has no single label to flip, and the thesis did not check it either.
"""
from __future__ import annotations

from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import pixel_gradient, text_target
from clip_xai.models.base import ClipAdapter
from clip_xai.types import TextTokens


class FGSM:
    """Sign-gradient step of size ``eps`` (in [0,1] pixel units) that raises (or lowers) similarity."""

    def __init__(self, eps: float, direction: str = "increase", name: str = "fgsm"):
        if not 0.0 <= float(eps) <= 1.0:
            raise ClipXaiError(f"perturbation.eps={eps} is outside [0, 1] (it is in [0,1] pixel units)",
                               "use e.g. perturbation.eps=0.0314 for 8/255")
        if direction not in ("increase", "decrease"):
            raise ClipXaiError(f"perturbation.direction={direction!r} is not known",
                               "use perturbation.direction=increase or decrease")
        self.name = name
        self.eps = float(eps)
        self.sign = 1.0 if direction == "increase" else -1.0

    def __call__(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens) -> Tensor:
        if self.eps == 0.0:
            return pixels.clone()
        g, _ = pixel_gradient(model, pixels, text_target(model, tokens))
        return (pixels + self.sign * self.eps * g.sign()).clamp(0.0, 1.0).detach()
