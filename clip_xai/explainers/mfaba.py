"""MFABA: boundary-path attribution (METHODS.md §2.12).

Zhu et al., "MFABA: A More Faithful and Accelerated Boundary-based Attribution Method for Deep
Neural Networks", AAAI 2024; reference code LMBTough/MFABA (``saliency/core/mfaba.py``) and the
CLIP adaptation LMBTough/NIB (``salicncy/mfaba.py``), as specified in METHODS.md. Written from
the specification, not from that code.
"""
from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.explainers.base import cosine, grad, other_target, pixel_gradient, text_target, tower_for
from clip_xai.explainers.saliency import REDUCTIONS, _GradientExplainer, check_choice, reduce_channels
from clip_xai.models.base import ClipAdapter
from clip_xai.progress import steps
from clip_xai.types import TextTokens

UPDATES = ("l2", "sign")


def same_token(tokens: TextTokens) -> Tensor:
    """(B, L, L) 1 where positions i, j hold the same id and both are real (attended) tokens.

    NIB steps rows of the token-embedding *table*: a row's gradient is the sum over every position
    holding that id, and the step moves all of them together; ``same_token @ g`` is that sum.
    """
    real = tokens.attention_mask.bool()
    same = tokens.ids[:, :, None] == tokens.ids[:, None, :]
    return (same & real[:, :, None] & real[:, None, :]).float()


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
    * ``attention`` (alias ``embedding``; NIB ``mfaba_vision``) on images: x₀ = the summed input
      embeddings (patches + CLS + positions, ``Tower.input_embedding``) *before* ``ln_pre`` /
      ``pre_layrnorm``, as NIB's ``get_hs``; the gradient runs through that LayerNorm. Sign step
      α = 0.01, then ``reduce`` over D (NIB: nansum ≡ mean after min-max), CLS dropped → (B, h, w).
      (Starting after the LayerNorm, as this module did before, gives a different map: the
      pre-LN gradient carries each token's 1/σ, and a sign step of 0.01 is a different move.)
    * Text (either variant; a caption has no pixels; NIB ``mfaba_text``): NIB steps the rows of
      the token-embedding table. Here x₀ = the summed input embeddings (token rows + positions,
      before AltCLIP's embedding LayerNorm) and each position's gradient is replaced by the sum
      over the caption's positions holding the same id (:func:`same_token`), so repeated ids
      move together and score alike, exactly as a table row does. Sign step α = 0.01,
      ``reduce`` over D → (B, L). Padding positions have no gradient and never move.
      NIB differentiates the logit (logit_scale·cos): the same signs and a map scaled by a
      constant, which min-max removes.

    ``alpha``/``update`` null pick those per-space defaults; a value overrides both spaces.
    """

    variants = ("pixel", "attention", "embedding")
    requires = {"text": frozenset({"blocks"}), "variant=attention": frozenset({"blocks"}),
                "variant=embedding": frozenset({"blocks"})}

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
        tower = tower_for(model, self.modality)
        inputs = pixels if self.modality == "image" else tokens
        target = other_target(model, self.modality, pixels, tokens)
        with torch.no_grad():
            e0, bias = tower.input_embedding(inputs)
        tie = None if self.modality == "image" else same_token(tokens)

        def gradient(e: Tensor) -> Tensor:
            with torch.enable_grad():
                e = e.detach().requires_grad_(True)
                out, _ = tower.run(tower.embedding_norm(e), bias)
                (g,) = grad(cosine(tower.pool(out, inputs), target), [e])
            return g if tie is None else tie @ g.float()

        attr = self._path(e0, gradient, *self._settings(False), clip=False)
        if self.modality == "image":
            return model.patch_map(REDUCTIONS[self.reduce](attr, -1))
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

