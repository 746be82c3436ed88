"""Random perturbations of the same size as the attacks: the controls of the sensitivity study.

A map that moves under FGSM may move because the step was adversarial or because any change of
that size moves it. These draws answer the second part; the report sets each attack against them
(the "adversarial excess").

* ``kind: sign``: every value moves by +ε or −ε with probability ½ each, the same L∞ size (and,
  before the clamp, the same L2 size) as an FGSM step, but in no particular direction.
* ``kind: gaussian``: n ~ N(0, σ²) per value with σ = ``sigma`` (default ε), clipped to [−ε, ε] so
  the row's ε is the same L∞ budget as the attacks' (with σ = ε about 32% of the draws are clipped).

Both are symmetric (n and −n are equally likely) and drawn from the per-sample seed, salted with
the row label (``noise_sign``, ``noise_gaussian``): they never replay the explainer's noise, nor
each other's draw, so running both gives two independent controls (one salt for both made the
sign control the sign of the Gaussian draw, the same direction at every value). The same seed and
sample give the same noise, whatever the batch. Then the [0,1] clamp of ``space``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.models.base import ClipAdapter
from clip_xai.perturbations.base import Perturbation, Perturbed, Space, box, perturbation_rng
from clip_xai.types import TextTokens

KINDS = ("sign", "gaussian")


def draw_noise(kind: str, shape: tuple[int, ...], seeds: Tensor, device: torch.device, eps: float,
               sigma: float) -> Tensor:
    """(B, *shape) seeded noise of ``kind`` inside [−ε, ε], each kind from its own salt (module docstring)."""
    n = perturbation_rng(seeds, device, salt=f"noise_{kind}").normal(*shape)
    if kind == "sign":
        return torch.where(n >= 0, eps, -eps)
    return (sigma * n).clamp(-eps, eps)


class Noise(Perturbation):
    """Seeded random ±ε signs or clipped Gaussian noise (see module docstring)."""

    def __init__(self, eps: float, kind: str = "sign", sigma: float | None = None, space: str = "pixel",
                 classes="auto", prompt: str = "a photo of a {}", name: str = "noise"):
        super().__init__(name, eps, space, classes, prompt)
        if kind not in KINDS:
            raise ClipXaiError(f"perturbation.kind={kind!r} is not known", "use perturbation.kind=sign or gaussian")
        if sigma is not None and not float(sigma) > 0:
            raise ClipXaiError(f"perturbation.sigma={sigma} must be positive", "use perturbation.sigma=null (= eps) or a positive value")
        self.kind = kind
        self.sigma = self.eps if sigma is None else float(sigma)

    @property
    def label(self) -> str:
        return f"{self.name}_{self.kind}"

    def perturb(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor,
                masks: Tensor | None = None) -> Perturbed:
        space = Space(self.space, model)
        z = space.to_space(pixels)
        noisy = z + draw_noise(self.kind, tuple(z.shape[1:]), seeds, z.device, self.eps, self.sigma).to(z.dtype)
        boxed, clamped = box(noisy)  # |noise| <= ε keeps z + noise inside the ball: the box alone
        return Perturbed(space.to_pixels(boxed), clamped)
