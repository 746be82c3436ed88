"""CLIP Surgery (Li et al., "CLIP Surgery for Better Explainability with Enhancement in
Open-Vocabulary Tasks", 2023; xmed-lab/CLIP_Surgery clip/clip_surgery_model.py, clip/clip.py,
demo.py; METHODS.md §2.6). Image only.

**Architecture surgery** on the last ``surgery_layers`` vision blocks, built from the blocks' own
pieces (:class:`BlockOps`): both paths read ``pre_attn(x_ori)``.

* original path: ``x_ori ← post_attn(x_ori, out_proj(MHA(q, k, v)))`` (residual + MLP);
* v–v path: per head q = k = v (the value projection, same 1/√d_head scale),
  ``x_new ← x_new + out_proj(softmax(v vᵀ/√d)·v)``, no MLP; ``x_new`` starts as the input of the
  first surgery block.

Then the prefix (CLS) rows of ``x_new`` are replaced by those of ``x_ori`` and ``project_tokens``
(final norm + projection) is applied to every token. With ``surgery_layers: 0`` this is
``project_tokens`` of the ordinary forward. (The new path adds the attention output through the
block's own residual step, ``BlockOps.add_attn``, so a layer scale is honoured; CLIP has none.)

**Feature surgery.**

* ``redundant: empty_prompt`` (default; the reference's "single text" recipe, CS demo.py):
  ``sim = img_tok · (t − r)``, with ``t`` the caption's unit embedding and ``r`` the
  prompt-ensembled embedding of the empty string "".
* ``redundant: class_set`` (the GE/PRED rule, Cyang-Zhao/Grad-Eclip generate_emap.py
  ``clip_surgery_map``): the caption is prepended to a fixed set of class names (ours is a short
  generic list written here; GE used 59 PASCAL-Context names) and CS's
  ``clip_feature_surgery`` is applied: per token ``p = softmax(2·img_tok·text_t)`` over the texts,
  ``w = p / mean(p)``, ``F_t = img_tok ⊙ text_t · w_t``, subtract the mean over texts, sum the
  channels, keep text 0 (the caption). The softmax weights are computed per token, as in the CS
  code (METHODS.md says "CLS"; the code uses every token).

**Text embeddings.** Auxiliary texts ("" or the class names) are encoded with
``templates: ensemble`` (default; each text through a short list of ImageNet-style templates
written here, unit-normalised, averaged, re-normalised; the reference used 85 templates) or
``templates: single`` (the text as is, no template). The caption itself is always encoded as
given: explainers receive token ids, not strings (the reference also wraps the target prompt in the
templates).

**Image-feature normalisation (reference quirk).** CS demo.py and GE normalise the per-token
features with ``norm(dim=1)`` on a (B, tokens, E) tensor, i.e. every channel over the TOKENS, not
every token over its channels. ``image_norm: tokens`` (default) reproduces that;
``image_norm: channels`` normalises each token (the evident intent).

**Map.** The patch rows of ``sim`` on the patch grid (B, h, w). The reference min-maxes each map
over the tokens and upsamples bilinearly to the image size (GE/PRED then min-max and Resize
again); the shared post-processing here min-maxes on the grid and then upsamples bilinearly. As
upsampling is linear and min-max is a positive affine map per image, the two differ only by a
per-map positive affine rescaling (the reference's final min-max), i.e. they are equivalent up to
the order of min-max.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import Explainer, maybe_no_grad, text_target
from clip_xai.models.base import ClipAdapter, Tower, merge_heads, split_heads
from clip_xai.types import TextTokens

# A short list of common ImageNet-style prompt templates (the reference ensembles 85).
TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of the {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a blurry photo of the {}.",
    "there is a {} in the scene.",
)

# Generic object/stuff names for ``redundant: class_set`` (GE used the 59 PASCAL-Context classes).
CLASS_NAMES = (
    "person", "dog", "cat", "bird", "horse", "car", "bus", "bicycle", "boat", "airplane",
    "tree", "grass", "flower", "sky", "water", "road", "building", "wall", "floor", "window",
    "table", "chair", "bottle", "food", "book",
)

REDUNDANT = ("empty_prompt", "class_set")
TEMPLATE_MODES = ("single", "ensemble")
IMAGE_NORMS = ("tokens", "channels")


def surgery_tokens(tower: Tower, pixels: Tensor, surgery_layers: int) -> Tensor:
    """(B, N, E) per-token embeddings after architecture surgery on the last ``surgery_layers`` blocks."""
    x, bias = tower.embed(pixels)
    start = tower.n_layers - surgery_layers
    x, _ = tower.run(x, bias, stop=start)
    x_new = x
    mask = None if bias is None else bias.to(x.dtype)
    for i in range(start, tower.n_layers):
        blk = tower.blocks[i]
        q, k, v = (split_heads(t, blk.n_heads) for t in blk.qkv(blk.pre_attn(x)))
        ctx_ori = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        ctx_vv = F.scaled_dot_product_attention(v, v, v, attn_mask=mask)
        x_new = blk.add_attn(x_new, blk.out_proj(merge_heads(ctx_vv)))
        x = blk.post_attn(x, blk.out_proj(merge_heads(ctx_ori)))
    if surgery_layers > 0:
        # n_prefix is an adapter attribute; the vision tower's pooled row is the CLS (row 0).
        pool = tower.pool_index(pixels)
        rows = torch.arange(x.shape[0], device=x.device)
        x_new = x_new.clone()
        x_new[rows, pool] = x[rows, pool]
    return tower.project_tokens(x_new)


class CLIPSurgery(Explainer):
    modalities = frozenset({"image"})
    differentiable = True

    def __init__(self, name: str = "surgery", modality: str = "image", surgery_layers: int = 6,
                 redundant: str = "empty_prompt", templates: str = "ensemble", image_norm: str = "tokens",
                 class_names: list[str] | None = None):
        super().__init__(name, modality)
        for key, val, allowed in (("redundant", redundant, REDUNDANT), ("templates", templates, TEMPLATE_MODES),
                                  ("image_norm", image_norm, IMAGE_NORMS)):
            if val not in allowed:
                raise ClipXaiError(f"surgery {key}={val!r} is not known",
                                   f"use explainer.{key}=" + " or ".join(allowed))
        if int(surgery_layers) < 0:
            raise ClipXaiError(f"surgery surgery_layers={surgery_layers} is negative",
                               "use explainer.surgery_layers>=0")
        self.surgery_layers = int(surgery_layers)
        self.redundant = redundant
        self.templates = templates
        self.image_norm = image_norm
        self.class_names = list(class_names) if class_names else list(CLASS_NAMES)
        # model → {device: (T, E) unit embeddings of the auxiliary texts}
        self._aux: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def check_model(self, model: ClipAdapter) -> None:
        if self.surgery_layers > model.vision.n_layers:
            raise ClipXaiError(
                f"surgery_layers={self.surgery_layers} exceeds the {model.vision.n_layers} vision blocks "
                f"of {model.name}",
                f"use explainer.surgery_layers<={model.vision.n_layers}",
            )

    # --- text side ---------------------------------------------------------------------------

    def ensemble_embeddings(self, model: ClipAdapter, texts: list[str]) -> Tensor:
        """(T, E) unit embeddings of ``texts`` (prompt-ensembled when ``templates: ensemble``)."""
        temps = TEMPLATES if self.templates == "ensemble" else ("{}",)
        prompts = [t.format(text) for text in texts for t in temps]
        with torch.no_grad():
            emb = model.encode_text(model.tokenize(prompts)).float()  # unit rows
        emb = F.normalize(emb.view(len(texts), len(temps), -1).mean(1), dim=-1)
        return emb

    def auxiliary(self, model: ClipAdapter) -> Tensor:
        """Unit embeddings of "" (empty_prompt) or of the class names (class_set), cached per model."""
        per_model = self._aux.setdefault(model, {})
        key = str(model.device)
        if key not in per_model:
            texts = [""] if self.redundant == "empty_prompt" else self.class_names
            per_model[key] = self.ensemble_embeddings(model, texts)
        return per_model[key]

    # --- map ---------------------------------------------------------------------------------

    def token_features(self, model: ClipAdapter, pixels: Tensor) -> Tensor:
        """(B, N, E) surgery token features, normalised as chosen by ``image_norm``."""
        with maybe_no_grad():
            feats = surgery_tokens(model.vision, pixels, self.surgery_layers).float()
        dim = 1 if self.image_norm == "tokens" else -1
        return feats / feats.norm(dim=dim, keepdim=True)

    def explain_image(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        self.check_model(model)
        text = text_target(model, tokens).float()  # (B,E) unit caption embeddings
        aux = self.auxiliary(model)
        feats = self.token_features(model, pixels)  # (B,N,E)
        if self.redundant == "empty_prompt":
            sim = torch.einsum("bne,be->bn", feats, text - aux[0])
        else:
            texts = torch.cat([text[:, None], aux[None].expand(text.shape[0], -1, -1)], dim=1)  # (B,T,E)
            prob = torch.einsum("bne,bte->bnt", feats, texts)
            p = (2 * prob).softmax(-1)
            w = p / p.mean(-1, keepdim=True)
            # Σ_e (F_0 − mean_t F_t) with F_t = feat ⊙ text_t · w_t, reduced to dot products.
            weighted = w * prob
            sim = weighted[..., 0] - weighted.mean(-1)
        return model.patch_map(sim)
