"""Confidence Drop / Confidence Increase, image and text protocols (METHODS.md §3.3).

Source of the protocol: YingWANGG/M2IB, scripts/eval.py ``get_metrics`` with the
``PerturbationConfidenceMetric`` of jacobgil/pytorch-grad-cam 1.4.6
(pytorch_grad_cam/metrics/perturbation_confidence.py, cam_mult_image.py); LMBTough/NIB,
scripts/eval.py for the corrected image-map shape. Read for the definitions; nothing copied.

"Confidence" is the cosine similarity between the embedding of the (possibly masked) input and
the embedding of the *unmasked* other modality. Per sample ``Δ = s(masked) − s(original)``;

* Confidence Drop = ``max(0, −Δ)·100`` (lower is better: keeping the relevant part keeps s);
* Confidence Increase = ``1[Δ > 0]·100`` (higher is better; its mean is the % of samples whose
  similarity went up).

**Image.** The reference multiplies the CLIP-*normalised* pixel tensor by the min-max map at input
resolution (soft masking toward 0 = the mean colour). Our models take [0,1] pixels and normalise
inside, so we build the [0,1] image whose normalisation is exactly ``norm(x)·map``:
``x' = mean + map·(x − mean)`` (per channel; exact, since ``(x' − mean)/std = map·(x − mean)/std``).
The target is ``f_T`` of the full caption (with start/end tokens).
Gotcha 1 (fixed, not reproduced): M2IB's eval.py passes the (224,224) map where the metric
indexes ``cams[i]`` per batch element, so every image is multiplied by the map's *first row*
broadcast over all rows. NIB's eval passes the map with a batch axis (the intended full 2-D
multiply). We use the full 2-D multiply.

**Text.** Tokens whose score is strictly above the ``percentile``-th percentile (default 50, the
median, linear interpolation like ``np.percentile``) of the *content* tokens' scores are kept;
the others are replaced. Two replacement rules:

* ``mask_id`` — M2IB as coded: the model input is the content tokens only (``ids[:, 1:-1]``: start
  and end tokens removed, for the baseline *and* the masked text), dropped tokens become
  ``model.mask_token_id`` (id 0 = "!" for CLIP, what ``ids ⊙ bool`` writes). Gotcha 2: without
  the EOT token CLIP pools at ``argmax(ids)``, i.e. at the highest-id surviving token; open_clip
  pools the same way, and :meth:`ClipAdapter.tokens_from_ids` recomputes exactly that, so this is
  reproduced, not corrected. Rows are left-aligned and padded with ``pad_id`` behind the content;
  with CLIP's causal mask and argmax pooling, trailing pads never reach the pooled state.
* ``pad_attention`` — dropped tokens become ``model.pad_id`` with attention-mask 0; start/end
  tokens stay, and the baseline is the unmodified caption. Needed for AltCLIP (METHODS.md §3.3
  gotcha 3): XLM-R id 0 is ``<s>``, and AltCLIP pools position 0, which M2IB's "remove the start
  token" rule would destroy.

``auto`` takes the backend's own ``model.text_mask_rule`` (``mask_id`` for CLIP tokenisers,
``pad_attention`` for AltCLIP): one place for the fact, in the adapter.
The target is ``f_I`` of the unmasked image.
"""
from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.types import TextTokens

HIGHER_IS_BETTER = {"conf_drop": False, "conf_incr": True}
TEXT_RULES = ("auto", "mask_id", "pad_attention")


# ------------------------------------------------------------------------------------- scores


def drop_increase(delta: Tensor) -> tuple[Tensor, Tensor]:
    """Δ = s(masked) − s(orig) → (Confidence Drop, Confidence Increase), both ×100, float64."""
    d = delta.double()
    return (-d).clamp_min(0) * 100.0, (d > 0).double() * 100.0


def cosine_to(emb: Tensor, unit_target: Tensor) -> Tensor:
    """Row-wise cosine of unit embeddings (B,E) with unit targets (B,E), float32."""
    return (emb.float() * unit_target.float()).sum(-1)


# -------------------------------------------------------------------------------------- image


def masked_image_pixels(pixels: Tensor, maps: Tensor, mean: Tensor) -> Tensor:
    """[0,1] pixels whose CLIP normalisation equals ``norm(pixels) ⊙ map``.

    ``pixels`` (B,3,H,W), ``maps`` (B,H,W) in [0,1] at the pixels' resolution, ``mean`` the
    per-channel normalisation mean (1,3,1,1). ``x' = mean + map·(x − mean)``, computed with
    ``torch.lerp``, which returns x exactly where map = 1 and the mean exactly where map = 0.
    """
    if maps.shape != (pixels.shape[0], *pixels.shape[-2:]):
        raise ValueError(f"maps {tuple(maps.shape)} do not match pixels {tuple(pixels.shape)}")
    m = maps.to(pixels.dtype)[:, None].expand_as(pixels)
    return torch.lerp(mean.to(pixels).expand_as(pixels), pixels, m)


def image_confidence(model, pixels: Tensor, maps: Tensor, text_emb: Tensor) -> Tensor:
    """cos(f_I(masked image), text_emb), (B,) float32; ``text_emb`` = unit f_T(full caption)."""
    with torch.no_grad():
        return cosine_to(model.encode_image(masked_image_pixels(pixels, maps, model.vision.mean)), text_emb)


# --------------------------------------------------------------------------------------- text


def resolve_text_rule(rule: str, model) -> str:
    """``auto`` → ``mask_id`` or ``pad_attention`` for this model (see module docstring)."""
    if rule not in TEXT_RULES:
        from clip_xai.errors import ClipXaiError

        raise ClipXaiError(f"unknown text rule {rule!r}", f"use metrics.text_rule= one of {', '.join(TEXT_RULES)}")
    return model.text_mask_rule if rule == "auto" else rule


def text_keep_mask(scores: Tensor, content_mask: Tensor, percentile: float = 50.0) -> Tensor:
    """(B,L) bool: content tokens whose score is > the per-sample percentile of content scores.

    Percentile over the content tokens only, linear interpolation (numpy's default); NaN scores
    (and rows without content) keep nothing.
    """
    content = content_mask.bool()
    vals = torch.where(content, scores.float(), torch.full_like(scores, float("nan"), dtype=torch.float32))
    thr = torch.nanquantile(vals, percentile / 100.0, dim=1, keepdim=True, interpolation="linear")
    return content & (vals > thr)


def content_only_tokens(model, tokens: TextTokens, keep: Tensor | None = None) -> TextTokens:
    """M2IB's text input: the content tokens only (start/end removed), left-aligned.

    Dropped tokens (``keep`` False) become ``model.mask_token_id``; positions behind a row's
    content are ``model.pad_id`` with attention 0. Pooling is recomputed by the model
    (``argmax(ids)`` on CLIP: gotcha 2).
    """
    content = tokens.content_mask.bool()
    # Stable sort puts each row's content positions first, in their original order.
    order = torch.sort((~content).to(torch.int8), dim=1, stable=True).indices
    counts = content.sum(1)
    width = max(int(counts.max()), 1)
    order = order[:, :width]
    ids = tokens.ids.gather(1, order)
    if keep is not None:
        ids = torch.where(keep.bool().gather(1, order), ids, torch.full_like(ids, model.mask_token_id))
    valid = torch.arange(width, device=ids.device)[None] < counts[:, None]
    ids = torch.where(valid, ids, torch.full_like(ids, model.pad_id))
    return model.tokens_from_ids(ids, valid.long())


def pad_attention_tokens(model, tokens: TextTokens, keep: Tensor) -> TextTokens:
    """Dropped content tokens → ``pad_id`` with attention 0; start/end and everything else kept."""
    drop = tokens.content_mask.bool() & ~keep.bool()
    ids = torch.where(drop, torch.full_like(tokens.ids, model.pad_id), tokens.ids)
    attn = tokens.attention_mask.masked_fill(drop, 0)
    return model.tokens_from_ids(ids, attn)


def masked_text_tokens(model, tokens: TextTokens, keep: Tensor, rule: str) -> tuple[TextTokens, TextTokens]:
    """(baseline tokens, masked tokens) for a resolved rule (``mask_id`` or ``pad_attention``)."""
    if rule == "mask_id":
        return content_only_tokens(model, tokens), content_only_tokens(model, tokens, keep)
    if rule == "pad_attention":
        return tokens, pad_attention_tokens(model, tokens, keep)
    raise ValueError(f"text rule must be resolved to mask_id or pad_attention, got {rule!r}")


def text_confidence(model, tokens: TextTokens, maps: Tensor, image_emb: Tensor, percentile: float = 50.0,
                    rule: str = "auto") -> tuple[Tensor, Tensor]:
    """(s_baseline, s_masked), (B,) float32: cos(f_T(text), image_emb) before/after masking.

    ``maps`` (B,L) token scores (any monotone normalisation; only their order matters);
    ``image_emb`` unit f_I of the unmasked image.
    """
    rule = resolve_text_rule(rule, model)
    keep = text_keep_mask(maps, tokens.content_mask, percentile)
    base, masked = masked_text_tokens(model, tokens, keep, rule)
    with torch.no_grad():
        return cosine_to(model.encode_text(base), image_emb), cosine_to(model.encode_text(masked), image_emb)
