"""Raw self-attention of the last block (METHODS.md §2.4; Cyang-Zhao/Grad-Eclip generate_emap.py).

Image: the pooled (CLS) row of the last block's attention over the patches. Text: the pooled row
(EOT for CLIP, ``<s>`` for AltCLIP) over the caption tokens. It ignores the other modality.

Choice (``heads``): ``single`` (default) reproduces the reference, which recomputes the last
block with ONE head of width D (scale 1/√D) instead of the model's H heads; ``mean`` averages
the model's real heads (the textbook definition).
"""
from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.explainers.base import Explainer, maybe_no_grad, pooled_rows
from clip_xai.models.base import ClipAdapter, Tower
from clip_xai.types import TextTokens


class SelfAttention(Explainer):
    modalities = frozenset({"image", "text"})
    differentiable = True

    def __init__(self, name: str = "selfattn", modality: str = "image", heads: str = "single", layer: int = -1):
        super().__init__(name, modality)
        if heads not in ("single", "mean"):
            from clip_xai.errors import ClipXaiError

            raise ClipXaiError(f"selfattn heads={heads!r} is not known", "use explainer.heads=single or mean")
        self.heads = heads
        self.layer = layer

    def _row(self, tower: Tower, inputs, index: Tensor) -> Tensor:
        layer = tower.layer(self.layer)
        heads = {layer: 1} if self.heads == "single" else None
        with maybe_no_grad():
            _, records = tower(inputs, record=(layer,), heads=heads, stop=layer + 1)
        return pooled_rows(records[layer].probs, index).mean(1)  # (B, N)

    def explain_image(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        return model.patch_map(self._row(model.vision, pixels, model.vision.pool_index(pixels)))

    def explain_text(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        return self._row(model.text, tokens, tokens.pool_index)
