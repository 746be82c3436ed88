"""HF transformers backend for ``CLIPModel`` (``model=hf_clip``), and the parts AltCLIP shares.

The towers recompute ``transformers.CLIPModel`` (transformers 5.x ``modeling_clip.py``) block by
block from the native modules (see :mod:`clip_xai.models.base`):

* Vision (shared with AltCLIP, whose vision tower is the same CLIP ViT): Conv2d patches (no bias)
  + class embedding + learned positions → ``pre_layrnorm`` → pre-LN ``CLIPEncoderLayer`` blocks
  (``x + out_proj(attn(layer_norm1 x))``; ``x + mlp(layer_norm2 x)``) with separate
  ``q_proj``/``k_proj``/``v_proj`` → ``post_layernorm`` of the CLS token → ``visual_projection``.
  HF scales q kᵀ by ``head_dim**-0.5`` inside its attention function; ``attend`` applies that
  scale itself, so :meth:`HfClipBlock.qkv` returns the *unscaled* q.
* Text: token + position embeddings → the same pre-LN blocks under a causal mask →
  ``final_layer_norm`` → the state at the first EOS token (``argmax`` of the ids for legacy
  configs with ``eos_token_id == 2``, as HF does) → ``text_projection``. HF also masks padded
  keys; under the causal mask those keys only reach states *after* the EOS token, which neither
  the pooled embedding nor any caption token sees, so the tower applies the causal mask alone and
  its maps do not depend on how a caption is padded.

Pretrained loads use the repository's own processor (tokenizer, mean/std). Random models
(``pretrained=false``) get :func:`clip_bpe_tokenizer`: the OpenAI CLIP BPE vocabulary that
open_clip ships, as a transformers ``CLIPTokenizer`` (no download), so ids equal open_clip's.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from clip_xai.errors import ClipXaiError
from clip_xai.models.base import BlockOps, ClipAdapter, PixelInput, Tower, keep_size_setting, square_size
from clip_xai.models.preprocess import OPENAI_MEAN, OPENAI_STD
from clip_xai.models.weights import OFFLINE_FIX, check_checkpoint, ensure_reachable_hf, load_errors, load_failure
from clip_xai.types import TextTokens

# CLIP (OpenAI) normalisation, the values of the OpenAI CLIPImageProcessor.

# Small random CLIP used when ``pretrained=false`` (overridable with ``config_overrides``):
# ViT-B/32-shaped (patch 32, QuickGELU) but 12 blocks of width 64.
TINY_CONFIG = {
    "vision_config": {
        "image_size": 224, "patch_size": 32, "hidden_size": 64, "intermediate_size": 256,
        "num_hidden_layers": 12, "num_attention_heads": 2, "hidden_act": "quick_gelu",
    },
    "text_config": {
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 12, "num_attention_heads": 2,
        "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu",
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    },
    "projection_dim": 64,
}


class HfClipBlock(BlockOps):
    """Pre-LN ``CLIPEncoderLayer``: x + out_proj(attn(layer_norm1 x)); x + mlp(layer_norm2 x)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.n_heads = layer.self_attn.num_heads

    def pre_attn(self, x: Tensor) -> Tensor:
        return self.layer.layer_norm1(x)

    def qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.layer.self_attn
        return a.q_proj(h), a.k_proj(h), a.v_proj(h)  # unscaled q: attend() applies 1/√dh

    def out_proj(self, ctx: Tensor) -> Tensor:
        return self.layer.self_attn.out_proj(ctx)

    def post_attn(self, x: Tensor, attn_out: Tensor) -> Tensor:
        x = x + attn_out
        return x + self.layer.mlp(self.layer.layer_norm2(x))


class HfClipVision(PixelInput, Tower):
    """HF CLIP ViT (CLIPModel, AltCLIPModel): patches + CLS + pos → pre_layrnorm → blocks →
    post_layernorm[CLS] → visual_projection."""

    stem_paths = ("vision_model.embeddings", "vision_model.pre_layrnorm")
    head_paths = ("vision_model.post_layernorm", "visual_projection")

    def __init__(self, model: nn.Module, mean: tuple, std: tuple, keep_size: bool = False):
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection
        self.blocks = [HfClipBlock(layer) for layer in self.vision_model.encoder.layers]
        self.width = self.vision_model.config.hidden_size
        cfg = self.vision_model.config
        self._set_pixels(square_size(cfg.image_size, "image size"), mean, std,
                         square_size(cfg.patch_size, "patch size"), keep_size)

    def input_embedding(self, pixels: Tensor) -> tuple[Tensor, None]:
        emb = self.vision_model.embeddings
        w = emb.patch_embedding.weight
        x = emb.patch_embedding(self.normalise(pixels).to(w.dtype))
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = emb.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        # keep-size mode: the positions interpolated as HF's interpolate_pos_encoding (same formula)
        return x + self.patch_positions(emb.position_embedding.weight, grid, x.dtype), None

    def embedding_norm(self, e: Tensor) -> Tensor:
        return self.vision_model.pre_layrnorm(e)

    def pool_index(self, pixels: Tensor) -> Tensor:
        return torch.zeros(pixels.shape[0], dtype=torch.long, device=pixels.device)

    def pool(self, x: Tensor, inputs=None) -> Tensor:
        """The base pool at the class token, callable without ``inputs`` (the index is always 0)."""
        return self.project_tokens(x[:, 0])

    def project_tokens(self, x: Tensor) -> Tensor:
        return self.visual_projection(self.vision_model.post_layernorm(x))


class HfClipText(Tower):
    """HF CLIP text transformer: embeddings → causal pre-LN blocks → final_layer_norm[EOS] → text_projection."""

    stem_paths = ("text_model.embeddings",)
    head_paths = ("text_model.final_layer_norm", "text_projection")

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = model.text_projection
        self.blocks = [HfClipBlock(layer) for layer in self.text_model.encoder.layers]
        self.width = self.text_model.config.hidden_size

    def input_embedding(self, tokens: TextTokens) -> tuple[Tensor, Tensor]:
        emb = self.text_model.embeddings
        n = tokens.ids.shape[1]
        x = emb.token_embedding(tokens.ids) + emb.position_embedding.weight[:n]
        causal = torch.full((n, n), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
        return x, causal

    def token_rows(self, ids: Tensor) -> Tensor:
        return self.text_model.embeddings.token_embedding(ids)

    def pool_index(self, tokens: TextTokens) -> Tensor:
        return tokens.pool_index

    def project_tokens(self, x: Tensor) -> Tensor:
        return self.text_projection(self.text_model.final_layer_norm(x))



def merge_config(base: dict, overrides: dict | None) -> dict:
    """``base`` with ``overrides`` merged in (keys ``vision``/``text`` alias the ``*_config`` ones)."""
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in (overrides or {}).items():
        key = {"vision": "vision_config", "text": "text_config"}.get(key, key)
        if key in ("vision_config", "text_config"):
            cfg[key].update(dict(value))
        else:
            cfg[key] = value
    return cfg


def load_pretrained(model_cls, family: str, repo_id: str, pretrained: bool | str, cache_dir: str | None,
                    config_overrides: dict | None) -> tuple[str, nn.Module]:
    """(source, model): ``model_cls.from_pretrained`` of ``repo_id`` (after the offline fail-fast
    check) or of a local ``save_pretrained`` directory (which must exist), with eager attention
    (so the native ``output_attentions`` works for cross-checks)."""
    if config_overrides:
        raise ClipXaiError(f"config_overrides only apply to random {family} models (pretrained=false)",
                           "drop config_overrides, or set pretrained=false")
    if pretrained is True:
        ensure_reachable_hf(repo_id, cache_dir)
        source = repo_id
    else:
        path = Path(str(pretrained)).expanduser()
        if not path.is_dir():
            raise ClipXaiError(f"{family} checkpoint directory {pretrained} does not exist",
                               f"pass pretrained=true to load {repo_id}, or a directory written by save_pretrained")
        source = str(path)
        check_checkpoint(path)  # its weight files: a damaged one named in one sentence, before transformers reads it
    try:
        return source, model_cls.from_pretrained(source, cache_dir=cache_dir, attn_implementation="eager")
    except torch.OutOfMemoryError:
        raise
    except load_errors() as err:
        if pretrained is not True:  # a local directory: one sentence naming it
            raise load_failure(source, model_cls.__name__, err) from err
        if not isinstance(err, (OSError, ValueError)):
            raise
        raise ClipXaiError(f"could not load {family} weights from {source}: {err}", OFFLINE_FIX) from err


def processor_mean_std(processor) -> tuple[tuple, tuple]:
    """Normalisation of a loaded processor's image processor (OpenAI's when it has none)."""
    ip = getattr(processor, "image_processor", None)
    if ip is not None and getattr(ip, "image_mean", None) is not None:
        return tuple(ip.image_mean), tuple(ip.image_std)
    return OPENAI_MEAN, OPENAI_STD


def random_model(model_cls, config_cls, cfg: dict, seed: int) -> nn.Module:
    """A randomly initialised HF model from ``cfg``, weights seeded by ``seed`` (global RNG untouched)."""
    config = config_cls(**cfg)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config)


def caption_lengths(tokenizer, captions: list[str]) -> list[int]:
    """Token counts of ``captions`` with start/end tokens, before padding or truncation."""
    return [len(ids) for ids in tokenizer(list(captions), verbose=False)["input_ids"]]


def check_caption_lengths(tokenizer, captions: list[str], context: int, family: str) -> None:
    """One clear error for a caption whose tokens (with start/end) exceed the context."""
    lengths = caption_lengths(tokenizer, captions)
    too_long = [c for c, n in zip(captions, lengths) if n > context]
    if too_long:
        raise ClipXaiError(f"caption too long for the {context}-token {family} context: {too_long[0][:80]!r}",
                           "shorten the caption (truncating it would drop the end token)")


def clip_bpe_tokenizer(model_max_length: int = 77):
    """The OpenAI CLIP BPE tokenizer as a transformers ``CLIPTokenizer``, built offline.

    Vocabulary and merge ranks come from the BPE file open_clip ships (``SimpleTokenizer``), which
    is the vocabulary of the OpenAI CLIP checkpoints (49408 ids, ``<|startoftext|>`` = 49406,
    ``<|endoftext|>`` = 49407, also the pad token as in ``openai/clip-vit-base-patch32``).
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    names = {simple.sot_token_id: "<|startoftext|>", simple.eot_token_id: "<|endoftext|>"}  # OpenAI's names
    vocab = {names.get(i, piece): i for piece, i in simple.encoder.items()}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length,
                         pad_token="<|endoftext|>")


def clip_processor(processor_cls, tokenizer, image_size: int):
    """``processor_cls`` (``CLIPProcessor``, ``AltCLIPProcessor``) of ``tokenizer`` and a CLIP image
    processor (shorter side to ``image_size``, centre crop, OpenAI mean/std), for random models."""
    from transformers import CLIPImageProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                            image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
    return processor_cls(image_processor=ip, tokenizer=tokenizer)


class HfDualEncoder(ClipAdapter):
    """What the transformers backends share: attaching a loaded model, saving, fixed-length tokenising.

    Fixed-length padding (as the HF processors do) keeps every text map independent of its batch
    mates; padding to the batch's longest caption would not.
    """

    family: str

    def _attach(self, model: nn.Module, processor, tokenizer, text: Tower, keep_size: bool = False) -> None:
        model.eval().requires_grad_(False)
        self.model = model
        self._processor = processor
        self._tokenizer = tokenizer
        mean, std = processor_mean_std(processor)
        self.vision = HfClipVision(model, mean, std, keep_size)
        self.text = text
        self.image_size = self.vision.image_size
        self.patch_size = square_size(model.config.vision_config.patch_size)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the model and its processor (or tokenizer) so that ``pretrained=directory`` reloads them."""
        self.model.save_pretrained(str(directory))
        (self._processor or self._tokenizer).save_pretrained(str(directory))

    def tokenize(self, captions: list[str]) -> TextTokens:
        """Start token, caption, end token, padded to the fixed context length."""
        check_caption_lengths(self._tokenizer, captions, self.context_length, self.family)
        enc = self._tokenizer(list(captions), padding="max_length", max_length=self.context_length,
                              return_tensors="pt")
        tokens = self.tokens_from_ids(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        return replace(tokens, texts=tuple(captions))

    def token_lengths(self, captions: list[str]) -> list[int]:
        """Token counts with the start and end tokens (what must fit the context)."""
        return caption_lengths(self._tokenizer, captions)


class HfClipAdapter(HfDualEncoder):
    """HF ``CLIPModel`` behind :class:`ClipAdapter`.

    ``pretrained``: True loads ``repo_id`` (hub id, after a fail-fast offline check); a string is
    a local directory written by ``save_pretrained``; False builds a RANDOM CLIP
    (:data:`TINY_CONFIG` updated with ``config_overrides``, weights seeded by ``seed``) with
    :func:`clip_bpe_tokenizer`. ``keep_size``: the input mode (``model.keep_size``; see
    :class:`~clip_xai.models.base.PixelInput`).
    """

    family = "CLIP"

    def __init__(self, name: str, repo_id: str = "openai/clip-vit-base-patch32", pretrained: bool | str = True,
                 seed: int = 0, cache_dir: str | None = None, config_overrides: dict | None = None,
                 keep_size: bool = False):
        super().__init__()
        from transformers import AutoProcessor, CLIPConfig, CLIPModel

        keep_size = keep_size_setting(keep_size)
        self.name = name
        self.pretrained = pretrained
        if pretrained is False or pretrained is None:
            cfg = merge_config(TINY_CONFIG, config_overrides)
            tokenizer = clip_bpe_tokenizer(cfg["text_config"]["max_position_embeddings"])
            if cfg["text_config"]["vocab_size"] != len(tokenizer):
                raise ClipXaiError(f"text vocab_size {cfg['text_config']['vocab_size']} differs from the "
                                   f"{len(tokenizer)}-id CLIP tokenizer", "leave text vocab_size at 49408")
            model = random_model(CLIPModel, CLIPConfig, cfg, seed)
            from transformers import CLIPProcessor

            processor = clip_processor(CLIPProcessor, tokenizer, square_size(cfg["vision_config"]["image_size"]))
        else:
            source, model = load_pretrained(CLIPModel, "CLIP", repo_id, pretrained, cache_dir, config_overrides)
            try:
                processor = AutoProcessor.from_pretrained(source, cache_dir=cache_dir)
            except (OSError, ValueError, TypeError) as err:
                raise ClipXaiError(f"no CLIP processor/tokenizer found with the weights in {source}: {err}",
                                   "save the processor next to the model (HfClipAdapter.save_pretrained)") from err
            tokenizer = processor.tokenizer
        self._attach(model, processor, tokenizer, HfClipText(model), keep_size)
        tcfg = model.config.text_config
        self.eos_id = int(tcfg.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self.mask_token_id = 0  # CLIP BPE id 0 ("!"), the M2IB protocol's dropped-token id, as on open_clip
        self.context_length = int(min(tcfg.max_position_embeddings, tokenizer.model_max_length or 77))

    def tokens_from_ids(self, ids: Tensor, attention_mask: Tensor | None = None) -> TextTokens:
        """Pool at the first EOS (HF: ``argmax`` of the ids for legacy ``eos_token_id == 2``);
        content = positions 1 .. EOS − 1."""
        if self.eos_id == 2:
            eos = ids.argmax(dim=-1)
        else:
            eos = ids.eq(self.eos_id).int().argmax(dim=-1)
        pos = torch.arange(ids.shape[1], device=ids.device)
        content = (pos[None] >= 1) & (pos[None] < eos[:, None])
        if attention_mask is None:
            attention_mask = (pos[None] <= eos[:, None]).long()
        return TextTokens(ids, attention_mask, eos, content)


def hf_clip_from_open_clip(oc_model: nn.Module):
    """The same network as a transformers ``CLIPModel``: open_clip CLIP weights mapped to HF keys.

    Works for OpenAI-style open_clip CLIPs (class-token ViT with ``ln_pre``, causal text pooled at
    EOT, no layer scale); open_clip's fused ``in_proj`` splits into q/k/v and its ``proj`` matrices
    become the transposed projection Linears. Used by the cross-backend tests, and to load a local
    open_clip checkpoint through the HF code path.
    """
    from open_clip.transformer import QuickGELU
    from transformers import CLIPConfig, CLIPModel

    v, t = oc_model.visual, oc_model
    ok = (getattr(v, "attn_pool", None) is None and getattr(v, "pool_type", None) == "tok"
          and not v.final_ln_after_pool and not isinstance(v.ln_pre, nn.Identity)
          and getattr(t, "text_pool_type", None) == "argmax" and t.attn_mask is not None
          and all(isinstance(b.ls_1, nn.Identity) for b in [*v.transformer.resblocks, *t.transformer.resblocks]))
    if not ok:
        raise ClipXaiError("only OpenAI-style open_clip CLIPs (class token, ln_pre, causal EOT text, no layer scale) "
                           "map onto transformers CLIPModel", "convert a ViT-B/L/H CLIP such as ViT-B-32-quickgelu")

    def tower(tr: nn.Module) -> dict:
        blk = tr.resblocks[0]
        return {"hidden_size": tr.width, "num_hidden_layers": len(tr.resblocks),
                "num_attention_heads": blk.attn.num_heads, "intermediate_size": blk.mlp.c_fc.out_features,
                "hidden_act": "quick_gelu" if isinstance(blk.mlp.gelu, QuickGELU) else "gelu",
                "layer_norm_eps": blk.ln_1.eps}

    vision = {**tower(v.transformer), "image_size": square_size(v.image_size), "patch_size": square_size(v.patch_size)}
    text = {**tower(t.transformer), "vocab_size": t.token_embedding.num_embeddings,
            "max_position_embeddings": t.positional_embedding.shape[0],
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=v.proj.shape[1])
    config._attn_implementation = "eager"
    hf = CLIPModel(config).eval()

    def blocks(prefix: str, tr: nn.Module, sd: dict) -> None:
        for i, b in enumerate(tr.resblocks):
            p = f"{prefix}.encoder.layers.{i}."
            for name, w in zip(("q_proj", "k_proj", "v_proj"), b.attn.in_proj_weight.chunk(3)):
                sd[p + f"self_attn.{name}.weight"] = w
            for name, w in zip(("q_proj", "k_proj", "v_proj"), b.attn.in_proj_bias.chunk(3)):
                sd[p + f"self_attn.{name}.bias"] = w
            pairs = {"self_attn.out_proj": b.attn.out_proj, "layer_norm1": b.ln_1, "layer_norm2": b.ln_2,
                     "mlp.fc1": b.mlp.c_fc, "mlp.fc2": b.mlp.c_proj}
            for name, mod in pairs.items():
                sd[p + name + ".weight"], sd[p + name + ".bias"] = mod.weight, mod.bias

    sd = {
        "vision_model.embeddings.class_embedding": v.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": v.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": v.positional_embedding,
        "vision_model.pre_layrnorm.weight": v.ln_pre.weight, "vision_model.pre_layrnorm.bias": v.ln_pre.bias,
        "vision_model.post_layernorm.weight": v.ln_post.weight, "vision_model.post_layernorm.bias": v.ln_post.bias,
        "visual_projection.weight": v.proj.T,
        "text_model.embeddings.token_embedding.weight": t.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": t.positional_embedding,
        "text_model.final_layer_norm.weight": t.ln_final.weight, "text_model.final_layer_norm.bias": t.ln_final.bias,
        "text_projection.weight": t.text_projection.T,
        "logit_scale": t.logit_scale.reshape(()),
    }
    blocks("vision_model", v.transformer, sd)
    blocks("text_model", t.transformer, sd)
    missing, unexpected = hf.load_state_dict({k: w.detach().clone() for k, w in sd.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ClipXaiError(f"open_clip → CLIPModel key mapping incomplete: missing {missing}, unexpected {unexpected}",
                           "report this: the open_clip or transformers layout changed")
    return hf
