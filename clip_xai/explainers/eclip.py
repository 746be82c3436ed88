"""Grad-ECLIP (Zhao et al., "Gradient-based Visual Explanation for Transformer-based CLIP", ICML 2024;
METHODS.md §2.3; reference Cyang-Zhao/Grad-Eclip generate_emap.py ``grad_eclip``/``grad_eclip_text``
and the two notebooks). Implemented from the paper/METHODS.md description, not copied.

The explained blocks are recomputed with ONE attention head of width D (``single_head``). For each
such block b, with ctx_b the attention output before ``out_proj`` and v_b the raw value vectors
(in-projection output, heads merged):

* g_b = ∂s/∂ctx_b at the pooled position (CLS / EOT / AltCLIP ``<s>``), s = cosine(f, target);
* λ_b[i] = min-max over the key span of cos(q_b[pool], k_b[i]) (``withksim``; 1 when off), where
  q/k are ``out_proj`` (bias included) applied to the merged q/k (``ksim_proj: true``, the
  generate_emap.py version the evaluations use) or the raw q/k (``false``, the notebooks);
* m_b[i] = Σ_d g_b[d]·v_b[i,d]·λ_b[i].

Image (target: the caption's text embedding): the last ``image_layers`` blocks (reference: 1),
map = Σ_b ReLU(m_b) on the patches; λ is min-maxed over the patches. Text (target: the image
embedding): the last ``text_layers`` blocks (reference: 8), map = ReLU(Σ_b m_b) over all positions;
λ is min-maxed over ``ksim_keys``: ``all`` positions of the padded sequence (reference: all 77 CLIP
positions) or ``attended`` ones (attention mask 1). Both adapters pad to the fixed context
length, so neither choice makes a map depend on its batch mates.
The reference divides the text scores by their sum; they are ≥ 0, so the shared min-max gives the
same map and the raw scores are returned.

``single_head: false`` keeps the model's heads (g, q, k, v still merged over heads).

Input size: the reference's evaluation explains each image at its own size (``imgprocess_keepsize``:
sides rounded to multiples of the patch size, positions interpolated bicubically in
``clip_encode_dense``). ``model.keep_size=true`` does the same (docs/models.md; pixels from
``clip_xai.models.preprocess.keep_size_pixels``), and the map comes out on the input's patch grid.
Measured against the reference run from its source on the same random ViT-B/16 (fp32, CPU; 3 photos
at 368×496, 496×304, 304×432): 1−r ≤ 2.5e-13 and max |Δ| ≤ 8.4e-9 on the raw map (map scale
≈1.5e-2), ≤ 4.2e-7 after min-max; image embedding 1−cos ≤ 1.2e-7; identical pixels. The default
(``keep_size=false``) explains the model-size crop, where the interpolation is the identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.attention import minmax_masked, pooled_vector, side, similarity_from
from clip_xai.explainers.base import Explainer, grad, maybe_detach, maybe_no_grad, other_target, tower_for
from clip_xai.models.base import ClipAdapter
from clip_xai.types import TextTokens


class GradECLIP(Explainer):
    modalities = frozenset({"image", "text"})
    requires = {"*": frozenset({"attention", "pooled_token"})}
    differentiable = True

    def __init__(self, name: str = "eclip", modality: str = "image", single_head: bool = True, withksim: bool = True,
                 ksim_proj: bool = True, image_layers: int = 1, text_layers: int = 8, ksim_keys: str = "all"):
        super().__init__(name, modality)
        if ksim_keys not in ("all", "attended"):
            raise ClipXaiError(f"eclip ksim_keys={ksim_keys!r} is not known", "use explainer.ksim_keys=all or attended")
        for key, n in (("image_layers", image_layers), ("text_layers", text_layers)):
            if int(n) < 1:
                raise ClipXaiError(f"eclip {key}={n} must be at least 1", f"use explainer.{key}=1 or more")
        self.single_head = bool(single_head)
        self.withksim = bool(withksim)
        self.ksim_proj = bool(ksim_proj)
        self.image_layers = int(image_layers)
        self.text_layers = int(text_layers)
        self.ksim_keys = ksim_keys

    def check_model(self, model: ClipAdapter) -> None:
        tower = tower_for(model, self.modality)
        n = self.image_layers if self.modality == "image" else self.text_layers
        if n > tower.n_layers:
            raise ClipXaiError(f"eclip asks for the last {n} blocks of a {tower.n_layers}-block {self.modality} tower",
                               f"use explainer.{self.modality}_layers={tower.n_layers} or less")

    def _block_scores(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, n: int) -> tuple[list[Tensor], object]:
        """Per-block m_b (B,N) for the last ``n`` blocks of the explained tower."""
        self.check_model(model)
        s = side(model, self.modality, pixels, tokens)
        tower = s.tower
        blocks = list(range(tower.n_layers - n, tower.n_layers))
        heads = {b: 1 for b in blocks} if self.single_head else None
        target = other_target(model, self.modality, pixels, tokens)
        sim, records = similarity_from(s, target, blocks[0], blocks, heads)
        grads = grad(sim, [records[b].ctx for b in blocks])
        if self.modality == "image":
            keys = s.token_mask(records[blocks[0]].ctx.shape[1])
        elif self.ksim_keys == "attended":
            keys = tokens.attention_mask.bool()
        else:
            keys = s.token_mask(tokens.ids.shape[1])
        scores = []
        with maybe_no_grad():
            for b, g in zip(blocks, grads):
                rec = records[b]
                v = maybe_detach(rec.merged("v"))
                m = (pooled_vector(g, s.pool)[:, None, :] * v).sum(-1)  # (B,N)
                if self.withksim:
                    q, k = maybe_detach(rec.merged("q")), maybe_detach(rec.merged("k"))
                    if self.ksim_proj:
                        q, k = tower.blocks[b].out_proj(q), tower.blocks[b].out_proj(k)
                    lam = F.cosine_similarity(pooled_vector(q, s.pool)[:, None, :], k, dim=-1)
                    m = m * minmax_masked(lam, keys)
                scores.append(m)
        return scores, s

    def explain_image(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        scores, s = self._block_scores(model, pixels, tokens, self.image_layers)
        return s.to_map(torch.stack(scores).relu().sum(0))

    def explain_text(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        scores, s = self._block_scores(model, pixels, tokens, self.text_layers)
        return s.to_map(torch.stack(scores).sum(0).relu())
