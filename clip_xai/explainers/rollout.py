"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020;
METHODS.md §2.5, as coded in Cyang-Zhao/Grad-Eclip generate_emap.py ``compute_rollout_attention``).

Â_b = rownorm(mean_heads(A_b) + I); J = Â_last ⋯ Â_start; map = J[pool, :] — the CLS row over the
patches (image) or the pooled row (EOT for CLIP, ``<s>`` for AltCLIP) over the tokens (text).
It ignores the other modality and needs no gradients. Implemented from the description, not copied.

Choice (``start_layer``): ``-1`` (default) reproduces the reference quirk — ``mm_interpret`` with
its default ``start_layer=-1`` collects only the last block, so the GE/PRED "rollout" is
rownorm(A_last + I)[CLS, patches]. ``0`` is the textbook multi-layer rollout.
"""
from __future__ import annotations

from torch import Tensor

from clip_xai.explainers.attention import attention_probs, blocks_from, rollout_joint, side
from clip_xai.explainers.base import Explainer, pooled_rows, tower_for
from clip_xai.models.base import ClipAdapter
from clip_xai.types import TextTokens


class Rollout(Explainer):
    modalities = frozenset({"image", "text"})
    requires = {"*": frozenset({"attention", "pooled_token"})}
    differentiable = True

    def __init__(self, name: str = "rollout", modality: str = "image", start_layer: int = -1):
        super().__init__(name, modality)
        self.start_layer = start_layer

    def check_model(self, model: ClipAdapter) -> None:
        tower_for(model, self.modality).layer(self.start_layer)

    def explain(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        s = side(model, self.modality, pixels, tokens)
        probs = attention_probs(s, blocks_from(s.tower, self.start_layer))
        return s.to_map(pooled_rows(rollout_joint(probs), s.pool))
