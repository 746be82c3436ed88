"""open_clip backend: any open_clip CLIP by name (``model=open_clip``), the presets ``vit_b16`` /
``vit_b32`` (OpenAI weights) and the tiny test model.

Vision towers:

* open_clip's own ``VisionTransformer`` (ViT-S/M/B/L/H/g/bigG, ``-quickgelu`` or not, any image
  size and patch size, ``plus`` widths, CLIPA): run block by block (:class:`OpenClipVision`).
  Image size and patch grid come from the built model; the preprocessing (resize mode,
  interpolation, crop, mean/std: ``model.preprocess``, :func:`open_clip_preprocess`) from its
  pretrained config. Pooling: class token (``pool_type='tok'``), average of the patch tokens
  (``'avg'``, CLIPA) with or without ``final_ln_after_pool``, and attentional pooling (CoCa
  style, ``attn_pool``); layer scale (``ls_1``/``ls_2``) and ``no_ln_pre`` are applied as the
  native forward does. Towers that do not pool one token say so in ``Tower.missing``, so methods
  reading the class token's attention row refuse them at start-up.
* Any other image encoder (ModifiedResNet, timm trunks such as SigLIP's attention-pool ViT,
  ConvNeXt, EVA): run as one native module (:class:`OpaqueVision`). Methods that only need the
  embedding (RISE, pixel gradients) work; the others get one clear start-up error.

Text towers: the CLIP text transformer (on the model, or ``model.text`` for ``CustomTextCLIP``)
with a causal mask or bidirectional with a padding mask, pooled at the EOT token (``argmax``),
a tokenizer-specific ``eos`` id, or the first/last position, projected by a matrix or a Linear.

Blocks are open_clip 3.x ``ResidualAttentionBlock`` s holding ``nn.MultiheadAttention`` (called
with ``need_weights=False``); attention is recomputed from ``in_proj_weight``/``in_proj_bias`` and
``out_proj`` (METHODS.md §1.2).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_xai.errors import ClipXaiError
from clip_xai.models.base import CAPABILITIES, BlockOps, ClipAdapter, PixelInput, Tower, keep_size_setting, square_size
from clip_xai.models.preprocess import Preprocess
from clip_xai.models.weights import ensure_reachable_weights
from clip_xai.types import TextTokens

CONFIG_DIR = Path(__file__).parent / "configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class OpenClipBlock(BlockOps):
    """Pre-LN open_clip ResidualAttentionBlock: x + ls_1(attn(ln_1 x)); x + ls_2(mlp(ln_2 x))."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.n_heads = block.attn.num_heads

    def pre_attn(self, x: Tensor) -> Tensor:
        return self.block.ln_1(x)

    def qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.block.attn
        return F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    def out_proj(self, ctx: Tensor) -> Tensor:
        return self.block.attn.out_proj(ctx)

    def add_attn(self, x: Tensor, attn_out: Tensor) -> Tensor:
        return x + self.block.ls_1(attn_out)

    def post_attn(self, x: Tensor, attn_out: Tensor) -> Tensor:
        x = self.add_attn(x, attn_out)
        return x + self.block.ls_2(self.block.mlp(self.block.ln_2(x)))


def _blocks(transformer: nn.Module, where: str) -> list[OpenClipBlock]:
    """Wrap the blocks of ``transformer``; one clear error for block types this engine cannot run."""
    for blk in transformer.resblocks:
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or hasattr(blk, "ln_1_kv") or not attn._qkv_same_embed_dim:
            raise ClipXaiError(
                f"the open_clip {where} block type {type(blk).__name__} is not supported (the engine recomputes "
                "standard fused-qkv self-attention; qk-norm, scaled-cosine and cross-attention blocks are not)",
                "use a standard open_clip ViT (e.g. ViT-B-16, ViT-L-14) or add a BlockOps for this block type",
            )
    return [OpenClipBlock(b) for b in transformer.resblocks]


class OpenClipVision(PixelInput, Tower):
    """open_clip VisionTransformer: conv patches + CLS + pos → ln_pre → blocks → pooling head.

    The head follows ``VisionTransformer._pool`` of open_clip 3.x: class token or patch average,
    ``ln_post`` before or after pooling, or an attentional pooler; then ``@ proj``.
    """

    stem_paths = ("visual.conv1", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre")
    head_paths = ("visual.attn_pool", "visual.ln_post", "visual.proj")

    def __init__(self, visual: nn.Module, mean: tuple, std: tuple, keep_size: bool = False):
        super().__init__()
        self.visual = visual
        self.blocks = _blocks(visual.transformer, "vision")
        self.width = visual.transformer.width
        self._set_pixels(square_size(visual.image_size, "image size"), mean, std,
                         square_size(visual.patch_size, "patch size"), keep_size)
        self.attn_pool = getattr(visual, "attn_pool", None)
        self.pool_type = visual.pool_type
        self.missing = {}
        if self.attn_pool is not None:
            why = "it pools with learned attention queries over all tokens (attentional pooling)"
            self.missing = {"pooled_token": why, "token_head": why}
        elif self.pool_type == "avg":
            self.missing = {"pooled_token": "it averages the patch tokens (pool_type='avg'); no single token "
                                            "carries the embedding"}
        elif self.pool_type != "tok":
            raise ClipXaiError(f"open_clip vision pool_type={self.pool_type!r} gives no image embedding",
                               "use a ViT config with pool_type 'tok' or 'avg', or an attentional pooler")

    def input_embedding(self, pixels: Tensor) -> tuple[Tensor, None]:
        v = self.visual
        x = v.conv1(self.normalise(pixels).to(v.conv1.weight.dtype))
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = self.patch_positions(v.positional_embedding, grid, x.dtype)
        return torch.cat([cls, x], dim=1) + pos, None  # patch dropout: identity in eval

    def embedding_norm(self, e: Tensor) -> Tensor:
        return self.visual.ln_pre(e)

    def pool_index(self, pixels: Tensor) -> Tensor:
        return torch.zeros(pixels.shape[0], dtype=torch.long, device=pixels.device)

    def _global_pool(self, x: Tensor) -> Tensor:
        return x[:, 1:].mean(dim=1) if self.pool_type == "avg" else x[:, 0]

    def pool(self, x: Tensor, inputs=None) -> Tensor:
        v = self.visual
        if self.attn_pool is not None:
            contrastive = getattr(v, "attn_pool_contrastive", None)
            if contrastive is not None:  # 'parallel' / 'cascade' pooler pairs
                x = v.ln_post(x)
                pooled = contrastive(x if v.attn_pool_type == "parallel" else self.attn_pool(x))
            else:  # CoCa: pool, then norm, then the first query (or the query average)
                pooled = self._global_pool(v.ln_post(self.attn_pool(x)))
        elif v.final_ln_after_pool:
            pooled = v.ln_post(self._global_pool(x))
        else:
            pooled = self._global_pool(v.ln_post(x))
        return pooled if v.proj is None else pooled @ v.proj

    def project_tokens(self, x: Tensor) -> Tensor:
        if self.attn_pool is not None:
            raise ClipXaiError("an attention-pooled vision tower has no per-token head", "use a class-token ViT")
        x = self.visual.ln_post(x)
        return x if self.visual.proj is None else x @ self.visual.proj


class OpaqueVision(PixelInput, Tower):
    """An image encoder run as ONE native module (ModifiedResNet, timm trunks): embeddings only.

    ``embed`` normalises the pixels, there are no blocks, and ``pool`` runs the whole encoder, so
    ``encode_image`` (and every method that needs only it) works; ``missing`` lists the rest.
    """

    def __init__(self, visual: nn.Module, image_size: int, mean: tuple, std: tuple, kind: str,
                 keep_size: bool = False):
        super().__init__()
        self.visual = visual
        self.blocks = []
        self.width = 0
        if keep_size:
            raise ClipXaiError(f"model.keep_size=true needs a ViT image tower with a patch grid; this model's image "
                               f"tower is a {kind}", "set model.keep_size=false, or use a ViT CLIP (e.g. model=vit_b16)")
        self._set_pixels(image_size, mean, std)
        why = f"the image tower is a {kind}, run as one piece with no transformer blocks to open"
        self.missing = {cap: why for cap in CAPABILITIES}

    def embed(self, pixels: Tensor) -> tuple[Tensor, None]:
        return self.normalise(pixels), None

    def pool_index(self, pixels: Tensor) -> Tensor:
        raise ClipXaiError("an opaque image tower has no pooled token", "use a ViT CLIP for this method")

    def pool(self, x: Tensor, inputs=None) -> Tensor:
        return self.visual(x)

    def project_tokens(self, x: Tensor) -> Tensor:
        raise ClipXaiError("an opaque image tower has no per-token head", "use a ViT CLIP for this method")


class OpenClipText(Tower):
    """open_clip text transformer: tokens + pos → blocks → ln_final[pool] → projection.

    ``src`` is the CLIP model itself (its text attributes live on it) or ``CustomTextCLIP.text``.
    The attention bias is the causal mask, or None for bidirectional towers (CLIPA, SigLIP text).
    open_clip 3.x configs cannot turn on its ``use_pad_mask``; such a tower is refused.
    """

    stem_paths = ("src.token_embedding", "src.positional_embedding")
    head_paths = ("src.ln_final", "src.text_projection")

    def __init__(self, model: nn.Module):
        super().__init__()
        src = getattr(model, "text", model)
        if not hasattr(src, "token_embedding") or not hasattr(src, "transformer"):
            raise ClipXaiError(f"open_clip text encoder {type(src).__name__} (Hugging Face text models) is not supported",
                               "use a CLIP with open_clip's own text transformer, or model=hf_clip / altclip")
        if getattr(src, "cls_emb", None) is not None:
            raise ClipXaiError("open_clip text towers with an appended class token (CoCa) are not supported",
                               "use a CLIP-style model (e.g. ViT-B-32 instead of coca_ViT-B-32)")
        self.src = src
        self.blocks = _blocks(src.transformer, "text")
        self.width = src.transformer.width
        self.pool_type = getattr(src, "text_pool_type", None) or getattr(src, "pool_type", "argmax")
        self.eos_id = getattr(src, "text_eos_id", None) if src is model else getattr(src, "eos_id", None)
        if self.pool_type not in ("argmax", "eos", "first", "last"):
            raise ClipXaiError(f"open_clip text pool_type={self.pool_type!r} gives no text embedding",
                               "use a text config with pool_type argmax, eos, first or last")
        if getattr(src, "use_pad_mask", False):
            raise ClipXaiError("open_clip text towers with a padding mask are not supported",
                               "use a causal or plain bidirectional text tower")
        self.pad_id = int(getattr(src, "pad_id", 0))

    def input_embedding(self, tokens: TextTokens) -> tuple[Tensor, Tensor | None]:
        m = self.src
        n = tokens.ids.shape[1]
        x = m.token_embedding(tokens.ids) + m.positional_embedding[:n]
        return x, None if m.attn_mask is None else m.attn_mask[:n, :n].to(x.dtype)

    def token_rows(self, ids: Tensor) -> Tensor:
        return self.src.token_embedding(ids)

    def pool_index(self, tokens: TextTokens) -> Tensor:
        return tokens.pool_index


    def project_tokens(self, x: Tensor) -> Tensor:
        x = self.src.ln_final(x)
        proj = self.src.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def _register_local_configs(arch: str) -> None:
    """Register the repo's own configs (``clip_xai/models/configs/<arch>.json``) with open_clip."""
    import open_clip

    config_file = CONFIG_DIR / f"{arch}.json"
    if config_file.exists():
        open_clip.add_model_config(config_file)


def open_clip_preprocess(arch: str, pretrained: str | None) -> dict:
    """``model.preprocess`` of an open_clip model, as ``open_clip.create_model`` sets it: open_clip's
    defaults, then the architecture config's ``preprocess_cfg``, then the pretrained tag's config
    (``open_clip.pretrained.get_pretrained_cfg``: metadata only, nothing is downloaded). With a
    checkpoint path or no weights: the defaults and the architecture's config."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    _register_local_configs(arch)
    cfg = merge_preprocess_dict(PreprocessCfg(), (open_clip.get_model_config(arch) or {}).get("preprocess_cfg", {}))
    tag = None if pretrained in (None, "", False) else str(pretrained)
    if tag is not None and not _is_path(tag):
        cfg = merge_preprocess_dict(cfg, open_clip.pretrained.get_pretrained_cfg(arch, tag) or {})
    keys = ("resize_mode", "interpolation", "mean", "std", "fill_color")
    return Preprocess.from_config(224, {k: cfg[k] for k in keys}).as_config()


def config_image_size(arch: str) -> int:
    """Input size of open_clip architecture ``arch`` (for the dataset config), 224 if unknown.

    An unknown name fails right after, with its own message, when the adapter is built.
    """
    import open_clip

    _register_local_configs(arch)
    cfg = open_clip.get_model_config(arch) or {}
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _is_path(pretrained: str) -> bool:
    return "/" in pretrained or pretrained.startswith((".", "~")) or pretrained.endswith(CHECKPOINT_SUFFIXES)


class OpenClipAdapter(ClipAdapter):
    """open_clip CLIP model behind :class:`ClipAdapter`.

    ``arch`` is an open_clip model name (``ViT-L-14-336``, ``ViT-B-16-quickgelu``) or the name of a
    JSON config in ``clip_xai/models/configs`` (``tiny``). ``pretrained`` is an open_clip tag
    (``openai``, ``laion2b_s32b_b82k``), a local checkpoint path, or None for RANDOM weights (then
    ``seed`` makes them reproducible; such a model is never pretrained). ``keep_size`` (``model.keep_size``)
    lets the image tower take pixels of any size whose sides are multiples of the patch size, with the
    learned positions interpolated to each input's grid (:class:`~clip_xai.models.base.PixelInput`).
    """

    def __init__(self, name: str, arch: str, pretrained: str | None = None, seed: int = 0,
                 cache_dir: str | None = None, preprocess: dict | None = None, keep_size: bool = False):
        super().__init__()
        import open_clip

        keep_size = keep_size_setting(keep_size)
        self.name = name
        _register_local_configs(arch)
        if arch not in open_clip.list_models():
            raise ClipXaiError(f"unknown open_clip architecture {arch!r}",
                               "use one of open_clip.list_models() or a config in clip_xai/models/configs")
        pretrained = str(pretrained) if pretrained not in (None, "", False) else None
        if pretrained is not None:
            if Path(pretrained).expanduser().exists():
                pretrained = str(Path(pretrained).expanduser())
            elif _is_path(pretrained):
                raise ClipXaiError(f"checkpoint file {pretrained} does not exist",
                                   "pass an existing checkpoint path or an open_clip tag as model.pretrained")
            else:
                ensure_reachable_weights(arch, pretrained, cache_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = open_clip.create_model(arch, pretrained=pretrained, cache_dir=cache_dir)
            except RuntimeError as err:
                raise ClipXaiError(f"could not load weights {pretrained!r} for {arch}: {err}",
                                   "check the tag or checkpoint path, or run offline with model=tiny") from err
        model.eval().requires_grad_(False)
        self.model = model
        self.arch = arch
        self.pretrained = pretrained
        pre = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = square_size(pre.get("size", getattr(model.visual, "image_size", 224)), "image size")
        #: the model's own preprocessing (``model.preprocess``: by default the pretrained tag's, see
        #: :func:`open_clip_preprocess`); the dataset transform applies its geometry, the tower its mean/std
        self.preprocess = Preprocess.from_config(size, preprocess if preprocess is not None
                                                 else open_clip_preprocess(arch, pretrained))
        mean, std = self.preprocess.mean, self.preprocess.std
        if hasattr(model.visual, "transformer") and hasattr(model.visual, "conv1"):
            self.vision = OpenClipVision(model.visual, mean, std, keep_size)
            self.patch_size = self.vision.patch_size
        else:
            kind = "timm trunk" if type(model.visual).__name__ == "TimmModel" else type(model.visual).__name__
            self.vision = OpaqueVision(model.visual, size, mean, std, kind, keep_size)
            self.patch_size = None
        self.image_size = self.vision.image_size
        self.text = OpenClipText(model)
        self.context_length = int(getattr(self.text.src, "context_length", None) or model.context_length)
        self._tokenizer = None  # loaded on first use (some tokenizers come from the hub)
        self.mask_token_id = 0  # CLIP BPE id 0 ("!") is what M2IB writes into dropped tokens
        self.pad_id = self.text.pad_id

    def _tok(self):
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.arch)
        return self._tokenizer

    def token_lengths(self, captions: list[str]) -> list[int]:
        tok = self._tok()
        if hasattr(tok, "encode"):  # open_clip's CLIP BPE tokenizer: <sot> caption <eot>
            return [len(tok.encode(c)) + 2 for c in captions]
        inner = getattr(tok, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers tokenizer
        if inner is None:
            raise ClipXaiError(f"cannot measure caption lengths with the {type(tok).__name__} tokenizer of {self.arch}",
                               "use a model whose open_clip tokenizer is the CLIP BPE or a Hugging Face tokenizer")
        return [len(ids) for ids in inner(list(captions))["input_ids"]]

    def tokenize(self, captions: list[str]) -> TextTokens:
        tok = self._tok()
        too_long = [c for c, n in zip(captions, self.token_lengths(captions)) if n > self.context_length]
        if too_long:
            raise ClipXaiError(
                f"caption too long for the {self.context_length}-token context: {too_long[0][:80]!r}",
                "shorten the caption (open_clip would silently truncate it and move the EOT token)",
            )
        ids = tok(captions).to(self.device)
        return replace(self.tokens_from_ids(ids), texts=tuple(captions))

    def tokens_from_ids(self, ids: Tensor, attention_mask: Tensor | None = None) -> TextTokens:
        """Pool where the text tower pools; content = the tokens between start and end tokens.

        ``argmax``: the EOT token has the largest id (CLIP BPE). ``eos``: the first ``eos_id``.
        ``first``/``last``: that position, content = the non-pad tokens.
        """
        b, n = ids.shape
        pos = torch.arange(n, device=ids.device)
        pool_type = self.text.pool_type
        if pool_type in ("argmax", "eos"):
            eot = ids.argmax(dim=-1) if pool_type == "argmax" else ids.eq(self.text.eos_id).int().argmax(dim=-1)
            content = (pos[None] >= 1) & (pos[None] < eot[:, None])
            if attention_mask is None:
                attention_mask = (pos[None] <= eot[:, None]).long()
            return TextTokens(ids, attention_mask, eot, content)
        real = ids.ne(self.pad_id)
        if attention_mask is None:
            attention_mask = real.long()
        pool = torch.full((b,), 0 if pool_type == "first" else n - 1, dtype=torch.long, device=ids.device)
        return TextTokens(ids, attention_mask, pool, real & attention_mask.bool())
