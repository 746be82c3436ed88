"""MaskCLIP dense features, GE variant (METHODS.md §2.9).

MaskCLIP: Zhou, Loy & Dai, "Extract Free Dense Labels from CLIP", ECCV 2022. Implemented as the
Grad-ECLIP benchmark uses it (Cyang-Zhao/Grad-Eclip, generate_emap.py ``clip_encode_dense``
"lastv" branch and ``mask_clip``).

For the last vision block with input ``x_in`` and raw value/key projections ``v``, ``k``:

* value path: the attention output is replaced by the projected values,
  ``v_final = post_attn(x_in, out_proj(v))`` (residual and MLP kept), then ``project_tokens``
  (final norm + projection on every token);
* map: ``cos(v_final[patch], f_T) · cos(k_out[CLS], k_out[patch])`` with ``k_out = out_proj(k)``
  (the out_proj Linear with its bias applied to the keys; this factor is NOT min-max normalised).

The reference takes ``v``/``k`` from its single-head recomputation of the last block (§2.3). The
head count only changes how q·k is split; the value and key projections themselves, merged back to
(N, D), are identical for any head count, so the model's own heads are used here. No gradients.

Choice (``ksim``): ``true`` (default) reproduces GE's key-similarity weighting; ``false`` gives the
plain MaskCLIP map ``cos(v_final[patch], f_T)``. Whether the original MaskCLIP keeps the residual
and MLP is unverified (§2.9); we follow GE. Image only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_xai.explainers.base import Explainer, maybe_no_grad, pooled_rows, text_target
from clip_xai.models.base import ClipAdapter
from clip_xai.types import TextTokens


class MaskCLIP(Explainer):
    modalities = frozenset({"image"})
    requires = {"*": frozenset({"attention", "pooled_token", "token_head"})}
    differentiable = True

    def __init__(self, name: str = "maskclip", modality: str = "image", ksim: bool = True):
        super().__init__(name, modality)
        self.ksim = bool(ksim)

    def explain_image(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        tower = model.vision
        last = tower.n_layers - 1
        block = tower.blocks[last]
        target = text_target(model, tokens)
        with maybe_no_grad():
            _, records = tower(pixels, record=(last,))
            rec = records[last]
            v_final = block.post_attn(rec.x_in, block.out_proj(rec.merged("v")))
            feats = F.normalize(tower.project_tokens(v_final).float(), dim=-1)  # (B,N,E)
            score = (feats * target.float()[:, None]).sum(-1)  # (B,N)
            if self.ksim:
                k_out = F.normalize(block.out_proj(rec.merged("k")).float(), dim=-1)  # (B,N,D)
                cls = pooled_rows(k_out, tower.pool_index(pixels))  # (B,D)
                score = score * (k_out * cls[:, None]).sum(-1)
        return model.patch_map(score)
