"""GAME: Chefer et al.'s generic attention-model explainability, bi-modal form (METHODS.md §2.2).

Chefer, Gur, Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021; reference code hila-chefer/Transformer-MM-Explainability
(CLIP_explainability.ipynb ``interpret``), reused by Cyang-Zhao/Grad-Eclip (generate_emap.py
``mm_interpret``). Implemented from the paper/METHODS.md description, not copied.

R = I; for each block b ≥ ``start_layer`` in forward order: Ā_b = mean_heads(clamp_min(∇A_b ⊙ A_b, 0)),
R ← R + Ā_b·R. Image map: R[CLS, patches]. Text map: R[pool, :] (EOT for CLIP, ``<s>`` for AltCLIP);
post-processing keeps the caption tokens only.

Choices:

* ``start_layer: -1`` (default) reproduces the reference quirk: only the LAST block is used, so
  the map is the pooled row of I + Ā_last (the identity adds nothing off the diagonal, so on the
  patches it is Ā_last[CLS, patches]). ``start_layer: 0`` is the full recursion of the paper.
* Target: the reference differentiates the logit, logit_scale·s (the notebook sums
  ``logits_per_image``), and so does ``target_scale: logit`` (default), which reads the
  checkpoint's own scale (exp of its ``logit_scale`` parameter: 100 for the OpenAI weights, other
  values for other checkpoints and random models). With one block the scale only multiplies the
  map (min-max removes it); with several blocks the k-th order terms of R scale like
  logit_scale^k, so the maps differ. A number (e.g. ``target_scale: 1``, the cosine) fixes the
  factor instead.
* Text: the reference divides R[eot, 1:eot] by its sum. R ≥ 0, so that is a positive rescaling and
  the shared min-max over the caption tokens gives the identical map; the raw row is returned.
"""
from __future__ import annotations

from torch import Tensor

from clip_xai.explainers.attention import (
    attention_and_grads, blocks_from, game_relevance, positive_grad_attention, side,
)
from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import Explainer, other_target, pooled_rows, tower_for
from clip_xai.models.base import ClipAdapter
from clip_xai.types import TextTokens


def target_scale_setting(value: float | str) -> float | str:
    """``"logit"`` or a positive number; anything else is refused before a run starts."""
    if value == "logit":
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise ClipXaiError(f"game target_scale={value!r} is neither 'logit' nor a positive number",
                           "use explainer.target_scale=logit (the checkpoint's own scale) or e.g. 1 (the cosine)")
    return number


class GAME(Explainer):
    modalities = frozenset({"image", "text"})
    requires = {"*": frozenset({"attention", "pooled_token"})}
    differentiable = True

    def __init__(self, name: str = "game", modality: str = "image", start_layer: int = -1,
                 target_scale: float | str = "logit"):
        super().__init__(name, modality)
        self.start_layer = start_layer
        self.target_scale = target_scale_setting(target_scale)

    def check_model(self, model: ClipAdapter) -> None:
        tower_for(model, self.modality).layer(self.start_layer)

    def scale_for(self, model: ClipAdapter) -> float:
        """The factor on the cosine target: the model's logit scale, or the configured number."""
        return model.logit_scale if self.target_scale == "logit" else self.target_scale

    def explain(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        s = side(model, self.modality, pixels, tokens)
        blocks = blocks_from(s.tower, self.start_layer)
        target = other_target(model, self.modality, pixels, tokens)
        probs, grads = attention_and_grads(s, target, blocks, scale=self.scale_for(model))
        cams = [positive_grad_attention(p, g) for p, g in zip(probs, grads)]
        return s.to_map(pooled_rows(game_relevance(cams), s.pool))
