"""Grad-CAM on the CLIP ViT token features (METHODS.md §2.1, GE variant; Selvaraju et al. 2017).

X = input tokens of block ``layer`` (default: the last block), G = ∂cos(f_I, f_T)/∂X. Channel
weights are G averaged over all tokens (CLS included); map = ReLU(Σ_d w_d·X[i,d]) on the patches.

Choice (``single_head_last``): the reference (Cyang-Zhao/Grad-Eclip) runs the last block as one
head of width D while taking this gradient; ``true`` (default) reproduces it, ``false`` uses the
model's real heads.
"""
from __future__ import annotations

from torch import Tensor

from clip_xai.explainers.base import Explainer, grad, text_target, vision_similarity
from clip_xai.models.base import ClipAdapter
from clip_xai.types import TextTokens


class GradCAM(Explainer):
    modalities = frozenset({"image"})
    requires = {"*": frozenset({"attention"})}
    differentiable = True

    def __init__(self, name: str = "gradcam", modality: str = "image", layer: int = -1, single_head_last: bool = True):
        super().__init__(name, modality)
        self.layer = layer
        self.single_head_last = single_head_last

    def explain_image(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        tower = model.vision
        layer = tower.layer(self.layer)
        heads = {tower.n_layers - 1: 1} if self.single_head_last else None
        s, records = vision_similarity(model, pixels, text_target(model, tokens), record=(layer,), heads=heads)
        x = records[layer].x_in
        (g,) = grad(s, [x])
        weights = g.mean(dim=1, keepdim=True)  # (B,1,D)
        cam = (weights * x).sum(-1).relu()  # (B,N)
        return model.patch_map(cam)
