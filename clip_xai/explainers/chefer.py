"""Last-block Grad⊙Attention ("chefer" in LMBTough/NIB, salicncy/chefer.py; METHODS.md §2.2 end).

The simplified form of Chefer et al. (ICCV 2021) that the NIB/ABM papers compare against:
map = mean_heads(ReLU(∇A ⊙ A))[pool, :] of block ``layer`` (default: the last block) with the
model's own heads — no identity, no recursion. Image: the CLS row over the patches. Text: the
pooled row (NIB takes index −1, which for its unpadded single HF CLIP caption is the EOT, i.e. the
pooled token; here ``tokens.pool_index``, so ``<s>`` on AltCLIP). Implemented from the
description, not copied.

Target: the cosine similarity, not NIB's ``logits_per_image`` = logit_scale·cosine; the scale
multiplies the map by a positive constant (ReLU is positively homogeneous) that min-max removes.
Shares :func:`clip_xai.explainers.attention.attention_and_grads` with GAME.
"""
from __future__ import annotations

from torch import Tensor

from clip_xai.explainers.attention import attention_and_grads, positive_grad_attention, side
from clip_xai.explainers.base import Explainer, other_target, pooled_rows, tower_for
from clip_xai.models.base import ClipAdapter
from clip_xai.types import TextTokens


class Chefer(Explainer):
    modalities = frozenset({"image", "text"})
    requires = {"*": frozenset({"attention", "pooled_token"})}
    differentiable = True

    def __init__(self, name: str = "chefer", modality: str = "image", layer: int = -1):
        super().__init__(name, modality)
        self.layer = layer

    def check_model(self, model: ClipAdapter) -> None:
        tower_for(model, self.modality).layer(self.layer)

    def explain(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        s = side(model, self.modality, pixels, tokens)
        block = s.tower.layer(self.layer)
        target = other_target(model, self.modality, pixels, tokens)
        (probs,), (grads,) = attention_and_grads(s, target, [block])
        return s.to_map(pooled_rows(positive_grad_attention(probs, grads), s.pool))
