"""Raw self-attention of the last block (METHODS.md §2.4; Cyang-Zhao/Grad-Eclip generate_emap.py).

Image: the pooled (CLS) row of the last block's attention over the patches. Text: the pooled row
(EOT for CLIP, ``<s>`` for AltCLIP) over the caption tokens. It ignores the other modality.

Choice (``heads``): ``single`` (default) reproduces the reference, which recomputes blocks with
ONE head of width D (scale 1/√D) instead of the model's H heads; ``mean`` averages the model's
real heads (the textbook definition). With ``single``, the last ``image_layers`` (reference: 1,
``clip_encode_dense``) or ``text_layers`` (reference: 8, ``clip_encode_text_dense(text, n=8)`` in
grad_eclip_text.ipynb ``self_attn``) blocks run single-head, as in Grad-ECLIP. For text this
matters: the earlier single-head blocks change the states that reach the last block, so its
attention row differs from a model whose last block alone is single-head.
"""
from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import Explainer, maybe_no_grad, pooled_rows, tower_for
from clip_xai.models.base import ClipAdapter, Tower
from clip_xai.types import TextTokens


class SelfAttention(Explainer):
    modalities = frozenset({"image", "text"})
    requires = {"*": frozenset({"attention", "pooled_token"})}
    differentiable = True

    def __init__(self, name: str = "selfattn", modality: str = "image", heads: str = "single", layer: int = -1,
                 image_layers: int = 1, text_layers: int = 8):
        super().__init__(name, modality)
        if heads not in ("single", "mean"):
            raise ClipXaiError(f"selfattn heads={heads!r} is not known", "use explainer.heads=single or mean")
        for key, n in (("image_layers", image_layers), ("text_layers", text_layers)):
            if int(n) < 1:
                raise ClipXaiError(f"selfattn {key}={n} must be at least 1", f"use explainer.{key}=1 or more")
        self.heads = heads
        self.layer = layer
        self.image_layers = int(image_layers)
        self.text_layers = int(text_layers)

    def check_model(self, model: ClipAdapter) -> None:
        tower = tower_for(model, self.modality)
        tower.layer(self.layer)
        n = self.image_layers if self.modality == "image" else self.text_layers
        if self.heads == "single" and n > tower.n_layers:
            raise ClipXaiError(f"selfattn asks for the last {n} blocks of a {tower.n_layers}-block {self.modality} tower",
                               f"use explainer.{self.modality}_layers={tower.n_layers} or less")

    def _row(self, tower: Tower, inputs, index: Tensor) -> Tensor:
        layer = tower.layer(self.layer)
        n = self.image_layers if self.modality == "image" else self.text_layers
        heads = {b: 1 for b in range(tower.n_layers - n, tower.n_layers)} if self.heads == "single" else None
        with maybe_no_grad():
            _, records = tower(inputs, record=(layer,), heads=heads, stop=layer + 1)
        return pooled_rows(records[layer].probs, index).mean(1)  # (B, N)

    def explain_image(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        self.check_model(model)
        return model.patch_map(self._row(model.vision, pixels, model.vision.pool_index(pixels)))

    def explain_text(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        self.check_model(model)
        return self._row(model.text, tokens, tokens.pool_index)
