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

**Feature surgery** (CS ``clip/clip.py`` ``clip_feature_surgery``):

* ``redundant: class_set`` (default; the thesis and Grad-ECLIP, ``generate_emap.py``
  ``clip_surgery_map``, called by the thesis's ``utils.py`` ``generate_hm``): the caption is
  placed before the 59 PASCAL-Context class names (``prompts/pascal_context_59.txt``). With T
  texts, ``p = softmax(2·img_CLS·text_t)`` over the texts (``weights: cls``: the CS code at HEAD
  takes the softmax from the CLS row only and applies it to every token; ``weights: token`` is the
  per-token softmax of CS's first commit), ``w = p / mean(p)``, ``F_t = img_tok ⊙ text_t · w_t``,
  subtract the mean over texts, sum the channels, keep text 0 (the caption). With the caption
  alone (``class_names: []``) this is 0 for every token: the map is constant and the study flags
  it (``constant_*``), where the reference divides 0 by 0.
* ``redundant: empty_prompt`` (CS ``demo.py``, "single text" section):
  ``sim = img_tok · (t − r)``, with ``t`` the caption's embedding and ``r`` the prompt-ensembled
  embedding of the empty string "". ``explainer=surgery_demo`` is that recipe as demo.py runs it.

**Text embeddings.** Every text goes through ``templates: ensemble`` (default; the 85 templates
of CS's ``encode_text_with_prompt_ensemble``, ``prompts/imagenet_templates_85.txt``: each
prompt unit-normalised, averaged, re-normalised) or ``templates: single`` (the text as is). The
caption too (``caption_templates: true``, as both references do, so the thesis encoded "a bad
photo of a a photo of a goldfinch."); ``false`` uses the caption's own embedding. Re-prompting
needs the caption strings (``TextTokens.texts``); their embeddings are cached per model.

**Image-feature normalisation.** GE/the thesis normalise the per-token features with
``norm(dim=1)`` on a (B, tokens, E) tensor, i.e. every channel over the TOKENS:
``image_norm: tokens`` (default). CS ``demo.py`` uses ``dim=-1``, each token over its channels:
``image_norm: channels``.

**Map.** The patch rows of ``sim`` on the patch grid (B, h, w). The reference min-maxes each map
over the tokens and upsamples bilinearly to the image size (GE/PRED then min-max and Resize
again); the shared post-processing here min-maxes on the grid and then upsamples bilinearly. As
upsampling is linear and min-max is a positive affine map per image, the two differ only by a
per-map positive affine rescaling (the reference's final min-max), i.e. they are equivalent up to
the order of min-max.
"""
from __future__ import annotations

import weakref
from importlib import resources

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import Explainer, maybe_no_grad, text_target
from clip_xai.models.base import ClipAdapter, Tower, merge_heads, split_heads
from clip_xai.types import TextTokens

PROMPTS = resources.files("clip_xai.explainers") / "prompts"
REDUNDANT = ("class_set", "empty_prompt")
TEMPLATE_MODES = ("ensemble", "single")
IMAGE_NORMS = ("tokens", "channels")
WEIGHTS = ("cls", "token")
#: Prompts encoded per text forward.
PROMPT_CHUNK = 1024
#: Caption embeddings kept per model and device (RIVAL10 has 10 captions, CC one per image).
CAPTION_CACHE = 4096


def prompt_list(filename: str) -> tuple[str, ...]:
    """The non-comment lines of a shipped prompt file (templates or class names)."""
    lines = (PROMPTS / filename).read_text(encoding="utf-8").splitlines()
    return tuple(line for line in lines if line and not line.startswith("#"))


TEMPLATES = prompt_list("imagenet_templates_85.txt")
CLASS_NAMES = prompt_list("pascal_context_59.txt")


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
    requires = {"*": frozenset({"attention", "pooled_token", "token_head"})}
    differentiable = True

    def __init__(self, name: str = "surgery", modality: str = "image", surgery_layers: int = 6,
                 redundant: str = "class_set", templates: str = "ensemble", caption_templates: bool = True,
                 image_norm: str = "tokens", weights: str = "cls", class_names: list[str] | None = None):
        super().__init__(name, modality)
        for key, val, allowed in (("redundant", redundant, REDUNDANT), ("templates", templates, TEMPLATE_MODES),
                                  ("image_norm", image_norm, IMAGE_NORMS), ("weights", weights, WEIGHTS)):
            if val not in allowed:
                raise ClipXaiError(f"surgery {key}={val!r} is not known",
                                   f"use explainer.{key}=" + " or ".join(allowed))
        if int(surgery_layers) < 0:
            raise ClipXaiError(f"surgery surgery_layers={surgery_layers} is negative",
                               "use explainer.surgery_layers>=0")
        self.surgery_layers = int(surgery_layers)
        self.redundant = redundant
        self.templates = templates
        self.caption_templates = bool(caption_templates)
        self.image_norm = image_norm
        self.weights = weights
        self.class_names = list(CLASS_NAMES if class_names is None else class_names)
        # model → {device: (T, E) unit embeddings of the auxiliary texts}
        self._aux: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # model → {(device, caption): (E,) unit embedding of the re-prompted caption}
        self._captions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

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
        with torch.no_grad():  # unit rows; padding trimmed per chunk (exact, see TextTokens.trimmed)
            emb = torch.cat([model.encode_text(model.tokenize(prompts[i : i + PROMPT_CHUNK]).trimmed()).float()
                             for i in range(0, len(prompts), PROMPT_CHUNK)])
        return F.normalize(emb.view(len(texts), len(temps), -1).mean(1), dim=-1)

    def auxiliary(self, model: ClipAdapter) -> Tensor | None:
        """Unit embeddings of "" (empty_prompt) or of the class names (class_set), cached per model;
        None for an empty class list."""
        per_model = self._aux.setdefault(model, {})
        key = str(model.device)
        if key not in per_model:
            texts = [""] if self.redundant == "empty_prompt" else self.class_names
            per_model[key] = self.ensemble_embeddings(model, texts) if texts else None
        return per_model[key]

    def caption_embeddings(self, model: ClipAdapter, tokens: TextTokens) -> Tensor:
        """(B, E) unit caption embeddings: re-prompted from the caption strings (reference), or the
        embeddings of the tokens as given (``caption_templates: false``).

        A caption whose prompts do not fit the context gets a NaN embedding, so its map is NaN and
        the study flags it (the reference's tokenizer raises there).
        """
        if not self.caption_templates:
            return text_target(model, tokens).float()
        if tokens.texts is None:
            raise ClipXaiError(
                "surgery with caption_templates=true needs the caption strings, but the tokens were built from ids",
                "tokenize captions with model.tokenize(...) or use explainer.caption_templates=false",
            )
        cache = self._captions.setdefault(model, {})
        device = str(model.device)
        missing = [t for t in dict.fromkeys(tokens.texts) if (device, t) not in cache]
        if len(cache) + len(missing) > CAPTION_CACHE:
            cache.clear()
        for text in missing:
            try:
                cache[(device, text)] = self.ensemble_embeddings(model, [text])[0]
            except ClipXaiError:  # a prompt longer than the context
                cache[(device, text)] = None
        embs = [cache[(device, t)] for t in tokens.texts]
        dim = next((e.shape[0] for e in embs if e is not None), None)
        if dim is None:
            dim = text_target(model, tokens).shape[-1]
        return torch.stack([e if e is not None else torch.full((dim,), float("nan"), device=model.device)
                            for e in embs])

    # --- map ---------------------------------------------------------------------------------

    def token_features(self, model: ClipAdapter, pixels: Tensor) -> Tensor:
        """(B, N, E) surgery token features, normalised as chosen by ``image_norm``."""
        with maybe_no_grad():
            feats = surgery_tokens(model.vision, pixels, self.surgery_layers).float()
        dim = 1 if self.image_norm == "tokens" else -1
        return feats / feats.norm(dim=dim, keepdim=True)

    def explain_image(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        self.check_model(model)
        text = self.caption_embeddings(model, tokens)  # (B,E)
        aux = self.auxiliary(model)
        feats = self.token_features(model, pixels)  # (B,N,E)
        if self.redundant == "empty_prompt":
            sim = torch.einsum("bne,be->bn", feats, text - aux[0])
        else:
            others = (aux[None].expand(text.shape[0], -1, -1) if aux is not None
                      else text.new_zeros(text.shape[0], 0, text.shape[-1]))
            texts = torch.cat([text[:, None], others], dim=1)  # (B,T,E)
            prob = torch.einsum("bne,bte->bnt", feats, texts)
            if self.weights == "cls":
                pool = model.vision.pool_index(pixels)
                rows = prob[torch.arange(prob.shape[0], device=prob.device), pool][:, None]  # (B,1,T)
            else:
                rows = prob
            p = (2 * rows).softmax(-1)
            w = p / p.mean(-1, keepdim=True)
            # Σ_e (F_0 − mean_t F_t) with F_t = feat ⊙ text_t · w_t, reduced to dot products.
            weighted = w * prob
            sim = weighted[..., 0] - weighted.mean(-1)
        return model.patch_map(sim)
