"""open_clip backend: OpenAI ViT-B/16, ViT-B/32 (QuickGELU) and the tiny test model.

Works with open_clip 3.x, whose blocks hold ``nn.MultiheadAttention`` (batch first, called with
``need_weights=False``). The towers recompute attention from ``in_proj_weight``/``in_proj_bias``
and ``out_proj`` (METHODS.md §1.2), which also covers open_clip 4's custom ``Attention`` that
keeps those parameter names.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_xai.errors import ClipXaiError
from clip_xai.models.base import BlockOps, ClipAdapter, Tower
from clip_xai.models.weights import ensure_reachable_weights
from clip_xai.types import TextTokens

CONFIG_DIR = Path(__file__).parent / "configs"


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


def _check_supported(transformer: nn.Module) -> None:
    for blk in transformer.resblocks:
        if not hasattr(blk, "attn") or not hasattr(blk.attn, "in_proj_weight") or hasattr(blk, "ln_1_kv"):
            raise ClipXaiError(
                f"open_clip block type {type(blk).__name__} is not supported (needs fused in_proj self-attention)",
                "use a standard open_clip ViT (e.g. ViT-B-16-quickgelu) or add a BlockOps for it",
            )


class OpenClipVision(Tower):
    """open_clip VisionTransformer: conv patches + CLS + pos → ln_pre → blocks → ln_post[CLS] @ proj."""

    def __init__(self, visual: nn.Module, mean: tuple, std: tuple):
        super().__init__()
        _check_supported(visual.transformer)
        if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise ClipXaiError("only CLS-token pooled open_clip ViTs are supported", "use an OpenAI-style ViT config")
        self.visual = visual
        self.blocks = [OpenClipBlock(b) for b in visual.transformer.resblocks]
        self.width = visual.transformer.width
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def input_embedding(self, pixels: Tensor) -> tuple[Tensor, None]:
        v = self.visual
        x = v.conv1((pixels - self.mean) / self.std)
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype), None

    def embedding_norm(self, e: Tensor) -> Tensor:
        return self.visual.ln_pre(e)

    def pool_index(self, pixels: Tensor) -> Tensor:
        return torch.zeros(pixels.shape[0], dtype=torch.long, device=pixels.device)

    def pool(self, x: Tensor, inputs=None) -> Tensor:
        return self.visual.ln_post(x[:, 0]) @ self.visual.proj

    def project_tokens(self, x: Tensor) -> Tensor:
        return self.visual.ln_post(x) @ self.visual.proj


class OpenClipText(Tower):
    """open_clip CLIP text tower: tokens + pos → causal blocks → ln_final[EOT] @ text_projection."""

    def __init__(self, model: nn.Module):
        super().__init__()
        _check_supported(model.transformer)
        if getattr(model, "text_pool_type", "argmax") != "argmax":
            raise ClipXaiError("only argmax (EOT) text pooling is supported", "use an OpenAI-style CLIP config")
        self.model = model
        self.blocks = [OpenClipBlock(b) for b in model.transformer.resblocks]
        self.width = model.transformer.width

    def input_embedding(self, tokens: TextTokens) -> tuple[Tensor, Tensor | None]:
        m = self.model
        n = tokens.ids.shape[1]
        x = m.token_embedding(tokens.ids) + m.positional_embedding[:n]
        bias = None if m.attn_mask is None else m.attn_mask[:n, :n].to(x.dtype)
        return x, bias

    def pool_index(self, tokens: TextTokens) -> Tensor:
        return tokens.pool_index

    def pool(self, x: Tensor, tokens: TextTokens) -> Tensor:
        x = self.model.ln_final(x[torch.arange(x.shape[0], device=x.device), tokens.pool_index])
        return _project(x, self.model.text_projection)

    def project_tokens(self, x: Tensor) -> Tensor:
        return _project(self.model.ln_final(x), self.model.text_projection)


def _project(x: Tensor, proj) -> Tensor:
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class OpenClipAdapter(ClipAdapter):
    """open_clip CLIP model behind :class:`ClipAdapter`.

    ``arch`` is an open_clip model name (``ViT-B-16-quickgelu``) or the name of a JSON config in
    ``clip_xai/models/configs`` (``tiny``). ``pretrained`` is an open_clip tag (``openai``), a
    local checkpoint path, or None for random weights (then ``seed`` makes them reproducible).
    """

    def __init__(self, name: str, arch: str, pretrained: str | None = None, seed: int = 0,
                 cache_dir: str | None = None):
        super().__init__()
        import open_clip

        self.name = name
        config_file = CONFIG_DIR / f"{arch}.json"
        if config_file.exists():
            # Register the repo's own configs (tiny) with open_clip; no download involved.
            open_clip.add_model_config(config_file)
        if arch not in open_clip.list_models():
            raise ClipXaiError(f"unknown open_clip architecture {arch!r}",
                               "use one of open_clip.list_models() or a config in clip_xai/models/configs")
        if pretrained and not Path(str(pretrained)).expanduser().exists():
            ensure_reachable_weights(arch, pretrained, cache_dir)
        torch.manual_seed(seed)
        try:
            model = open_clip.create_model(arch, pretrained=pretrained or None, cache_dir=cache_dir)
        except RuntimeError as err:
            raise ClipXaiError(f"could not load weights {pretrained!r} for {arch}: {err}",
                               "check the tag or checkpoint path, or run offline with model=tiny") from err
        model.eval().requires_grad_(False)
        self.model = model
        cfg = open_clip.get_model_config(arch)
        pre = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
        mean = tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(pre.get("std", open_clip.OPENAI_DATASET_STD))
        self.vision = OpenClipVision(model.visual, mean, std)
        self.text = OpenClipText(model)
        self.image_size = cfg["vision_cfg"]["image_size"]
        self.patch_size = cfg["vision_cfg"]["patch_size"]
        self.context_length = model.context_length
        self._tokenizer = open_clip.get_tokenizer(arch)
        self.pretrained = pretrained
        self.mask_token_id = 0  # CLIP BPE id 0 ("!") is what M2IB writes into dropped tokens
        self.pad_id = 0

    def tokenize(self, captions: list[str]) -> TextTokens:
        tok = self._tokenizer
        too_long = [c for c in captions if len(tok.encode(c)) + 2 > self.context_length]
        if too_long:
            raise ClipXaiError(
                f"caption too long for the {self.context_length}-token context: {too_long[0][:80]!r}",
                "shorten the caption (open_clip would silently truncate it and move the EOT token)",
            )
        ids = tok(captions).to(self.device)
        return self.tokens_from_ids(ids)

    def tokens_from_ids(self, ids: Tensor, attention_mask: Tensor | None = None) -> TextTokens:
        eot = ids.argmax(dim=-1)  # EOT has the largest id; open_clip pools here too
        pos = torch.arange(ids.shape[1], device=ids.device)
        content = (pos[None] >= 1) & (pos[None] < eot[:, None])
        if attention_mask is None:
            attention_mask = (pos[None] <= eot[:, None]).long()
        return TextTokens(ids, attention_mask, eot, content)

