"""HF transformers backend: AltCLIP (BAAI/AltCLIP, and small random AltCLIP models for tests).

The towers recompute the native forward of ``transformers.AltCLIPModel`` block by block from the
native modules' own weights (see :mod:`clip_xai.models.base`). Every detail below follows the
installed ``transformers/models/altclip/modeling_altclip.py`` (transformers 5.x):

* Vision (``AltCLIPVisionModel``): the CLIP ViT of ``CLIPModel``, run by the shared
  :class:`~clip_xai.models.hf_clip.HfClipVision` (same module names, same forward).
* Text (``AltCLIPTextModel``, XLM-R large in BAAI/AltCLIP): RoBERTa embeddings (word + token type 0
  + padding-aware positions, then LayerNorm) → **post-LN** ``AltRobertaLayer`` blocks
  (``h = LN(dense(attn(x)) + x)``; ``out = LN(dense(act(dense(h))) + h)``), bidirectional with an
  additive key-padding mask → ``pre_LN`` and ``transformation`` applied to every token → the
  state at **position 0** (``<s>``) → ``text_projection``. (METHODS.md §1.3)

Dropout is left out everywhere (the adapter runs in eval mode, where it is the identity).

Tokeniser: XLM-R ids are ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3. Because id 0 is
``<s>``, writing 0 into dropped tokens (the CLIP M2IB protocol) would insert BOS tokens; this
adapter sets ``mask_token_id = pad_id`` = 1 and dropped tokens must also get attention-mask 0
(METHODS.md §3.3 gotcha 3). Pretrained loads use the repository's own ``XLMRobertaTokenizer``.
Random models (tests, ``model=tiny``-style runs) get :func:`tiny_xlmr_tokenizer`: the same
transformers ``XLMRobertaTokenizer`` class (same special ids, same ``<s> … </s>`` template) built
offline from a ~100-piece character vocabulary. It is for tests only; its ids mean nothing to
pretrained AltCLIP weights.
"""
from __future__ import annotations

import string

import torch
from torch import Tensor, nn

from clip_xai.errors import ClipXaiError
from clip_xai.models.base import BlockOps, Tower, keep_size_setting, square_size
from clip_xai.models.hf_clip import (
    HfDualEncoder,
    clip_processor,
    load_pretrained,
    merge_config,
    random_model,
)
from clip_xai.types import TextTokens

# FlagAI/BAAI AltCLIP encode text with max_length 77 (the CLIP context), although the XLM-R
# tokenizer itself allows 512.
ALTCLIP_CONTEXT = 77

# Small random AltCLIP used when ``pretrained=False`` (overridable with ``config_overrides``).
TINY_CONFIG = {
    "vision_config": {
        "image_size": 224, "patch_size": 16, "hidden_size": 64, "intermediate_size": 256,
        "num_hidden_layers": 12, "num_attention_heads": 2,
    },
    "text_config": {
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 12, "num_attention_heads": 2,
        "project_dim": 64, "max_position_embeddings": ALTCLIP_CONTEXT + 2,
    },
    "projection_dim": 64,
}


class AltClipTextBlock(BlockOps):
    """Post-LN XLM-R ``AltRobertaLayer``.

    ``pre_attn`` is the identity (no norm before attention); ``out_proj`` is the attention output
    ``dense`` (``attention.output.dense``); ``post_attn(x, a)`` is ``h = LayerNorm(a + x)`` followed
    by the feed-forward ``LayerNorm(output.dense(act(intermediate.dense(h))) + h)``. So
    ``BlockRecord.attn_out`` is the attention branch before its residual and LayerNorm.
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.n_heads = layer.attention.self.num_attention_heads

    def pre_attn(self, x: Tensor) -> Tensor:
        return x

    def qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = self.layer.attention.self
        return s.query(h), s.key(h), s.value(h)

    def out_proj(self, ctx: Tensor) -> Tensor:
        return self.layer.attention.output.dense(ctx)

    def post_attn(self, x: Tensor, attn_out: Tensor) -> Tensor:
        layer = self.layer
        h = layer.attention.output.LayerNorm(attn_out + x)
        ffn = layer.output
        return ffn.LayerNorm(ffn.dense(layer.intermediate(h)) + h)


class AltClipText(Tower):
    """AltCLIP XLM-R text tower.

    Embeddings → post-LN blocks → pre_LN → transformation → state at position 0 → text_projection.
    """

    stem_paths = ("text_model.roberta.embeddings",)
    head_paths = ("text_model.pre_LN", "text_model.transformation", "text_projection")

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = model.text_projection
        roberta = self.text_model.roberta
        self.blocks = [AltClipTextBlock(layer) for layer in roberta.encoder.layers]
        self.width = self.text_model.config.hidden_size
        self.pad_id = int(self.text_model.config.pad_token_id)

    def position_ids(self, ids: Tensor) -> Tensor:
        """RoBERTa/fairseq positions: ``pad + cumsum(ids != pad)`` for real tokens, ``pad`` for pads.

        Follows ``AltRobertaEmbeddings.create_position_ids_from_input_ids``: positions come from the
        ids (not the attention mask), so a token replaced by pad also shifts later positions.
        """
        real = ids.ne(self.pad_id).long()
        return torch.cumsum(real, dim=1) * real + self.pad_id

    def input_embedding(self, tokens: TextTokens) -> tuple[Tensor, Tensor]:
        emb = self.text_model.roberta.embeddings
        ids = tokens.ids
        x = (emb.word_embeddings(ids) + emb.token_type_embeddings.weight[0]
             + emb.position_embeddings(self.position_ids(ids)))
        keep = tokens.attention_mask.to(torch.bool)[:, None, None, :]  # (B,1,1,L): mask padded keys
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~keep, torch.finfo(x.dtype).min)  # HF's additive eager mask value
        return x, bias

    def embedding_norm(self, e: Tensor) -> Tensor:
        return self.text_model.roberta.embeddings.LayerNorm(e)

    def token_rows(self, ids: Tensor) -> Tensor:
        return self.text_model.roberta.embeddings.word_embeddings(ids)

    def pool_index(self, tokens: TextTokens) -> Tensor:
        return tokens.pool_index

    def project_tokens(self, x: Tensor) -> Tensor:
        # pre_LN and transformation act per token, so the base pool (token first) equals HF's order.
        tm = self.text_model
        return self.text_projection(tm.transformation(tm.pre_LN(x)))


def tiny_xlmr_tokenizer(model_max_length: int = ALTCLIP_CONTEXT):
    """TEST-ONLY offline XLM-R tokenizer for random AltCLIP models.

    The real ``XLMRobertaTokenizer`` class (transformers ≥ 5 builds it from a vocabulary list,
    no download, no sentencepiece) over a character vocabulary: ``<s>``=0, ``<pad>``=1,
    ``</s>``=2, ``<unk>``=3 (the XLM-R special ids), ``▁`` (word start), the 94 printable ASCII
    characters, and ``<mask>`` last (as in XLM-R). Other characters map to ``<unk>``. It is
    deterministic; its ids are meaningless for pretrained AltCLIP weights.
    """
    from transformers import XLMRobertaTokenizer

    pieces = ["▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -1.0) for p in pieces] + [("<mask>", 0.0)]
    try:
        return XLMRobertaTokenizer(vocab=vocab, model_max_length=model_max_length)
    except TypeError as err:  # transformers 4.x needs a sentencepiece file instead
        raise ClipXaiError(
            f"this transformers version cannot build an XLM-R tokenizer offline ({err})",
            "install transformers>=5, or load a saved AltCLIP directory that includes its tokenizer",
        ) from err


class AltClipAdapter(HfDualEncoder):
    """HF ``AltCLIPModel`` behind :class:`ClipAdapter`.

    ``pretrained``: True loads ``repo_id`` from the hub/cache (after a fail-fast offline check);
    a string is a local directory written by ``save_pretrained`` (model, plus processor or
    tokenizer); False builds a small random AltCLIP (:data:`TINY_CONFIG` updated with
    ``config_overrides``, weights seeded by ``seed``) with the test-only
    :func:`tiny_xlmr_tokenizer`. Models load with ``attn_implementation="eager"`` so that the
    native ``output_attentions=True`` works for cross-checks. ``keep_size``: the input mode
    (``model.keep_size``; see :class:`~clip_xai.models.base.PixelInput`).
    """

    text_mask_rule = "pad_attention"  # XLM-R id 0 is <s>: writing 0 would insert start tokens
    family = "AltCLIP"

    def __init__(self, name: str, repo_id: str = "BAAI/AltCLIP", pretrained: bool | str = True, seed: int = 0,
                 cache_dir: str | None = None, config_overrides: dict | None = None, keep_size: bool = False):
        super().__init__()
        from transformers import AltCLIPConfig, AltCLIPModel

        keep_size = keep_size_setting(keep_size)
        self.name = name
        self.pretrained = pretrained
        if pretrained is False or pretrained is None:
            cfg = merge_config(TINY_CONFIG, config_overrides)
            tokenizer = tiny_xlmr_tokenizer()
            cfg["text_config"].setdefault("vocab_size", len(tokenizer))
            if cfg["text_config"]["vocab_size"] < len(tokenizer):
                raise ClipXaiError(f"text vocab_size {cfg['text_config']['vocab_size']} is smaller than the "
                                   f"{len(tokenizer)}-piece test tokenizer", "leave text vocab_size unset")
            model = random_model(AltCLIPModel, AltCLIPConfig, cfg, seed)
            processor = _make_processor(tokenizer, square_size(model.config.vision_config.image_size))
        else:
            source, model = load_pretrained(AltCLIPModel, "AltCLIP", repo_id, pretrained, cache_dir,
                                            config_overrides)
            processor, tokenizer = _load_processor(source, cache_dir, model)
        self._attach(model, processor, tokenizer, AltClipText(model), keep_size)
        tcfg = model.config.text_config
        self.pad_id = int(tcfg.pad_token_id)
        self.bos_id = int(tcfg.bos_token_id)
        self.eos_id = int(tcfg.eos_token_id)
        # XLM-R id 0 is <s>: masked tokens become pad + attention-mask 0 (METHODS.md §3.3 gotcha 3).
        self.mask_token_id = self.pad_id
        max_tok = getattr(tokenizer, "model_max_length", ALTCLIP_CONTEXT) or ALTCLIP_CONTEXT
        # positions run pad+1 .. pad+L, so the position table bounds L too.
        self.context_length = int(min(ALTCLIP_CONTEXT, max_tok, tcfg.max_position_embeddings - self.pad_id - 1))

    def tokens_from_ids(self, ids: Tensor, attention_mask: Tensor | None = None) -> TextTokens:
        """Pool at position 0 (``<s>``); content = positions 1 .. first ``</s>`` − 1 that are attended.

        Without ``attention_mask``, every non-pad id is attended.
        """
        if attention_mask is None:
            attention_mask = ids.ne(self.pad_id).long()
        n = ids.shape[1]
        pos = torch.arange(n, device=ids.device)
        is_eos = ids.eq(self.eos_id)
        first_eos = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1), torch.full_like(ids[:, 0], n))
        content = (pos[None] >= 1) & (pos[None] < first_eos[:, None]) & attention_mask.bool()
        pool = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        return TextTokens(ids, attention_mask, pool, content)


def _make_processor(tokenizer, image_size: int):
    """AltCLIPProcessor (CLIP image processor with OpenAI mean/std + the tokenizer) for random models."""
    from transformers import AltCLIPProcessor

    return clip_processor(AltCLIPProcessor, tokenizer, image_size)


def _load_processor(source: str, cache_dir: str | None, model: nn.Module):
    """(processor or None, tokenizer) saved with the weights; the test tokenizer only for tiny vocabularies."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(source, cache_dir=cache_dir)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            return processor, tokenizer
        if callable(getattr(processor, "batch_decode", None)):  # AutoProcessor fell back to a tokenizer
            return None, processor
    except (OSError, ValueError, TypeError):
        pass
    try:
        return None, AutoTokenizer.from_pretrained(source, cache_dir=cache_dir)
    except (OSError, ValueError, TypeError) as err:
        tiny = tiny_xlmr_tokenizer()
        if model.config.text_config.vocab_size == len(tiny):
            return _make_processor(tiny, square_size(model.config.vision_config.image_size)), tiny
        raise ClipXaiError(f"no tokenizer found with the AltCLIP weights in {source}: {err}",
                           "save the processor/tokenizer next to the model (AltClipAdapter.save_pretrained)") from err
