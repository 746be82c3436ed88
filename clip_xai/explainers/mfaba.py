"""MFABA: boundary-path attribution (METHODS.md §2.12).

Zhu et al., "MFABA: A More Faithful and Accelerated Boundary-based Attribution Method for Deep
Neural Networks", AAAI 2024; reference code LMBTough/MFABA (``saliency/core/mfaba.py``) and the
CLIP adaptation LMBTough/NIB (``salicncy/mfaba.py``), as specified in METHODS.md. Written from
the specification, not from that code.
"""
from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.explainers.base import cosine, grad, image_target, pixel_gradient, text_target
from clip_xai.explainers.saliency import REDUCTIONS, _GradientExplainer, check_choice, reduce_channels, text_input_gradient
from clip_xai.models.base import ClipAdapter
from clip_xai.progress import steps
from clip_xai.types import TextTokens

UPDATES = ("l2", "sign")


def descend(x: Tensor, g: Tensor, alpha: float, update: str) -> Tensor:
    """One step DOWN the similarity: x − α·g/‖g‖₂ (per sample) or x − α·sign(g)."""
    if update == "sign":
        return x - alpha * g.sign()
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
    return x - alpha * g / norm


class MFABA(_GradientExplainer):
    """Attribution = −Σ_{t<T} (x_{t+1} − x_t) ⊙ g_t along a path that lowers s = cos(f_I, f_T).

    The path descends the similarity, as MFABA descends the class probability and the NIB CLIP
    adaptation descends the image–text similarity (there is no class boundary in CLIP, so there
    is no early stop, as in NIB); ``steps`` = 10 (NIB; MFABA's classifier uses up to 50).

    * ``pixel`` (default) on images: x₀ = the [0, 1] pixels, g_t = ∂s/∂x_t, MFABA "sharp" step
      x_{t+1} = clip_[0,1](x_t − α·g_t/‖g_t‖₂) with α = 0.1 (0.001 × 100), then ``reduce`` over
      channels → (B, H, W).
    * ``attention`` (alias ``embedding``; NIB) on images: x₀ = the token-embedding output of
      ``Tower.embed`` (patch + CLS + positions; note this engine's embed also applies
      ``ln_pre``/``pre_layrnorm``, NIB's ``hs`` is taken before it), sign step α = 0.01, then
      ``reduce`` over D (NIB: nansum ≡ mean after min-max), CLS dropped → (B, h, w).
    * Text (either variant; a caption has no pixels): the NIB text path on the caption's token
      embeddings, via ``Tower.embed`` + ``run`` (NIB edits the embedding-table rows; here it is
      the per-position embedding output, so repeated ids and positions are separate), sign
      step α = 0.01, ``reduce`` over D → (B, L).

    ``alpha``/``update`` null pick those per-space defaults; a value overrides both spaces.
    """

    variants = ("pixel", "attention", "embedding")

    def __init__(self, name: str = "mfaba", modality: str = "image", variant: str = "pixel", steps: int = 10,
                 alpha: float | None = None, update: str | None = None, reduce: str = "mean"):
        super().__init__(name, modality, variant, reduce, -1)
        if update is not None:
            check_choice(name, "update", update, UPDATES)
        check_choice(name, "reduce", reduce, REDUCTIONS)
        self.steps = steps
        self.alpha = alpha
        self.update = update

    def check_model(self, model: ClipAdapter) -> None:
        return None

    def _settings(self, pixel_space: bool) -> tuple[float, str]:
        alpha = self.alpha if self.alpha is not None else (0.1 if pixel_space else 0.01)
        update = self.update if self.update is not None else ("l2" if pixel_space else "sign")
        return alpha, update

    def explain(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        if self.modality == "image" and self.variant == "pixel":
            target = text_target(model, tokens)
            attr = self._path(pixels, lambda x: pixel_gradient(model, x, target)[0], *self._settings(True), clip=True)
            return reduce_channels(attr, self.reduce, "image")
        alpha, update = self._settings(False)
        if self.modality == "image":
            target = text_target(model, tokens)
            tower = model.vision
            with torch.no_grad():
                x0, bias = tower.embed(pixels)

            def gradient(x: Tensor) -> Tensor:
                with torch.enable_grad():
                    x = x.detach().requires_grad_(True)
                    out, _ = tower.run(x, bias)
                    (g,) = grad(cosine(tower.pool(out, pixels), target), [x])
                return g

            attr = self._path(x0, gradient, alpha, update, clip=False)
            return model.patch_map(REDUCTIONS[self.reduce](attr, -1))
        target = image_target(model, pixels)
        with torch.no_grad():
            x0, _ = model.text.embed(tokens)
        attr = self._path(x0, lambda x: text_input_gradient(model, tokens, target, x)[1], alpha, update, clip=False)
        return reduce_channels(attr, self.reduce, "text")

    def _path(self, x: Tensor, gradient, alpha: float, update: str, clip: bool) -> Tensor:
        x = x.detach().float()
        attr = torch.zeros_like(x)
        for _ in steps(self.steps, self.name, samples=x.shape[0]):  # progress with the job's ETA
            g = gradient(x).float()
            nxt = descend(x, g, alpha, update)
            if clip:
                nxt = nxt.clamp(0, 1)
            attr -= (nxt - x) * g
            x = nxt
        return attr

