"""Saliency Map, the vanilla gradient (METHODS.md §2.10), and helpers shared with FastIG/MFABA.

Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks: Visualising Image
Classification Models and Saliency Maps", ICLR workshop 2014. CLIP adaptation of LMBTough/NIB
(``salicncy/saliencymap.py``; identical in LMBTough/ABE-XAI ``multimodel``), as specified in
METHODS.md. Written from the specification, not from that code.

Variants shared by the three gradient methods (``variant``):

* ``pixel`` (default): gradients of s = cos(f_I, f_T) with respect to the model's **input**:
  [0, 1] pixels for image maps (normalisation happens inside the model) → (B, 3, H, W),
  reduced over channels → (B, H, W) at image size. A caption has no pixels; its input is the
  token-embedding output of ``Tower.embed`` (token + position embeddings, plus AltCLIP's
  embedding LayerNorm), reduced over the D channels → (B, L).
* ``attention``: the NIB/ABE CLIP adaptation on the attention probabilities A of block
  ``layer`` (the last by default) of the explained tower, pooled row (CLS; EOT for CLIP text,
  ``<s>`` for AltCLIP), mean over heads → patch grid (B, h, w) or tokens (B, L). NIB targets the
  logit (= logit_scale·s); a constant factor that min-max removes.

``reduce`` (channel reduction of input-space attributions): ``mean`` | ``max`` | ``sum`` |
``abs_mean``. METHODS.md leaves it UNVERIFIED; the default ``mean`` follows the only source read
(the ABE-XAI demo averages channels, ``vmap.mean(1)``). ``mean`` and ``sum`` differ by a constant
factor, so they give the same map after min-max (NIB's ``nansum`` over D included).
"""
from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.attention import Side, attention_and_grads, side
from clip_xai.explainers.base import (
    Explainer,
    cosine,
    grad,
    image_target,
    other_target,
    pixel_gradient,
    pooled_rows,
    text_target,
    tower_for,
)
from clip_xai.models.base import ClipAdapter
from clip_xai.types import TextTokens

REDUCTIONS = {
    "mean": lambda a, dim: a.mean(dim),
    "max": lambda a, dim: a.amax(dim),
    "sum": lambda a, dim: a.sum(dim),
    "abs_mean": lambda a, dim: a.abs().mean(dim),
}


def check_choice(name: str, key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ClipXaiError(f"{name} {key}={value!r} is not known",
                           f"use explainer.{key}=" + " | ".join(sorted(allowed)))


def reduce_channels(attr: Tensor, how: str, modality: str) -> Tensor:
    """Input-space attribution → raw map: (B, 3, H, W) → (B, H, W); (B, L, D) → (B, L)."""
    return REDUCTIONS[how](attr, 1 if modality == "image" else -1)


def text_input_gradient(model: ClipAdapter, tokens: TextTokens, target: Tensor, x: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(e, ∂cos(f_T(e), target)/∂e, cos) at the token-embedding output e (default: the caption's)."""
    tower = model.text
    with torch.no_grad():
        e, bias = tower.embed(tokens)
    e = e if x is None else x
    with torch.enable_grad():
        e = e.detach().requires_grad_(True)
        out, _ = tower.run(e, bias)
        s = cosine(tower.pool(out, tokens), target)
        (g,) = grad(s, [e])
    return e.detach(), g, s.detach()


def input_gradient(model: ClipAdapter, modality: str, pixels: Tensor, tokens: TextTokens) -> tuple[Tensor, Tensor]:
    """(input, gradient of the cosine with the other modality) in the explained tower's input space."""
    if modality == "image":
        g, _ = pixel_gradient(model, pixels, text_target(model, tokens))
        return pixels, g
    e, g, _ = text_input_gradient(model, tokens, image_target(model, pixels))
    return e, g


def attention_gradient(model: ClipAdapter, modality: str, pixels: Tensor, tokens: TextTokens,
                       layer: int) -> tuple[Tensor, Tensor, Side]:
    """(A, ∂s/∂A, side): attention probabilities (B, H, N, N) of block ``layer`` and their gradient."""
    s = side(model, modality, pixels, tokens)
    (probs,), (g,) = attention_and_grads(s, other_target(model, modality, pixels, tokens), [s.tower.layer(layer)])
    return probs, g, s


def attention_map(s: Side, scores: Tensor) -> Tensor:
    """(B, H, N, N) per-head scores → pooled row, mean over heads → (B, h, w) or (B, L)."""
    return s.to_map(pooled_rows(scores, s.pool).mean(1))


class _GradientExplainer(Explainer):
    modalities = frozenset({"image", "text"})
    requires = {"text": frozenset({"blocks"}), "variant=attention": frozenset({"attention", "pooled_token"})}
    variants = ("pixel", "attention")

    def __init__(self, name: str, modality: str, variant: str, reduce: str, layer: int):
        super().__init__(name, modality)
        check_choice(name, "variant", variant, self.variants)
        check_choice(name, "reduce", reduce, REDUCTIONS)
        self.variant = variant
        self.reduce = reduce
        self.layer = layer

    def check_model(self, model: ClipAdapter) -> None:
        if self.variant == "attention":
            tower_for(model, self.modality).layer(self.layer)


class Saliency(_GradientExplainer):
    """Vanilla gradient. ``pixel``: |∂s/∂x| reduced over channels (default ``mean``; Simonyan et
    al. take the ``max``, available via ``reduce: max``). The absolute value follows ABE's
    ``SaliencyMap`` and the METHODS.md recommendation (captum in LMBTough/MFABA keeps the sign).
    ``attention``: mean over heads of |∂s/∂A| on the pooled row of block ``layer`` (NIB)."""

    differentiable = True

    def __init__(self, name: str = "saliency", modality: str = "image", variant: str = "pixel",
                 reduce: str = "mean", layer: int = -1):
        super().__init__(name, modality, variant, reduce, layer)

    def explain(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        if self.variant == "attention":
            _, g, s = attention_gradient(model, self.modality, pixels, tokens, self.layer)
            return attention_map(s, g.abs())
        _, g = input_gradient(model, self.modality, pixels, tokens)
        return reduce_channels(g.abs(), self.reduce, self.modality)
