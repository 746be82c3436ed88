"""FastIG: a one-gradient integrated-gradients surrogate, input ⊙ gradient (METHODS.md §2.11).

Generic form from LMBTough/ABE-XAI (``abe/algorithm/explanation/fast_ig.py``); CLIP adaptation
from LMBTough/NIB (``salicncy/fast_ig.py``), both as specified in METHODS.md. Written from the
specification, not from that code. Variants and ``reduce``: see :mod:`clip_xai.explainers.saliency`.
"""
from __future__ import annotations

from torch import Tensor

from clip_xai.explainers.saliency import (
    _GradientExplainer,
    attention_gradient,
    attention_map,
    input_gradient,
    reduce_channels,
)
from clip_xai.models.base import ClipAdapter
from clip_xai.types import TextTokens


class FastIG(_GradientExplainer):
    """``pixel``: x ⊙ ∂s/∂x on [0, 1] pixels (text: token-embedding output ⊙ its gradient),
    signed, reduced over channels (default ``mean``: METHODS.md leaves the reduction UNVERIFIED;
    the ABE-XAI demo averages channels). ``attention`` (NIB): A ⊙ ∂s/∂A of block ``layer``
    (last by default), pooled row, mean over heads."""

    differentiable = True

    def __init__(self, name: str = "fastig", modality: str = "image", variant: str = "pixel",
                 reduce: str = "mean", layer: int = -1):
        super().__init__(name, modality, variant, reduce, layer)

    def explain(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        if self.variant == "attention":
            probs, g, s = attention_gradient(model, self.modality, pixels, tokens, self.layer)
            return attention_map(s, probs * g)
        x, g = input_gradient(model, self.modality, pixels, tokens)
        return reduce_channels(x * g, self.reduce, self.modality)
