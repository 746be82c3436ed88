"""The one model interface every explainer talks to.

A backend (open_clip, HF AltCLIP) is wrapped as a :class:`ClipAdapter` holding two :class:`Tower`
objects. A tower runs its transformer *itself*, block by block, from the native modules' own
weights (:class:`BlockOps`), instead of hooking the native forward. That gives every method the
same access on every backend:

* attention probabilities with gradients (open_clip's fused attention never returns them;
  METHODS.md §1.2), q/k/v, the pre-``out_proj`` context and every block's input/output,
  recorded in :class:`BlockRecord` for the blocks asked for;
* a different head count for chosen blocks (Grad-ECLIP / raw self-attention recompute the last
  block with one head, METHODS.md §2.3);
* edits of the hidden state *before* block ``i`` (bottlenecks: ABM at the input of block 9,
  M2IB after block 9 = before block 10) and partial runs from block ``i`` onward.

Nothing is patched or hooked, so nothing can be left attached. The recomputed forward equals the
native one (tests compare against ``encode_image`` / ``encode_text``). Blocks that need no
record use ``F.scaled_dot_product_attention`` (fused kernels on GPU).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_xai.errors import ClipXaiError
from clip_xai.types import TextTokens

Edit = Callable[[Tensor], Tensor]

#: What a tower can give an explainer. Explainers declare the ones they need
#: (``Explainer.requires``); a tower lists the ones it lacks, with the reason, in ``Tower.missing``.
CAPABILITIES = {
    "blocks": "transformer blocks that the adapter runs itself (hidden states between blocks, "
              "their edits and partial runs; for images, one token per patch of a grid)",
    "attention": "the self-attention probabilities of every block, the last one included",
    "pooled_token": "an embedding read from ONE output token (class token, EOT or <s>), "
                    "whose attention row is the map",
    "token_head": "the final norm and projection applicable to every token (dense per-token embeddings)",
}


@dataclass
class BlockRecord:
    """Tensors of one block forward. q/k/v/probs are per head: (B,H,N,dh) and (B,H,N,N)."""

    x_in: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    probs: Tensor
    ctx: Tensor  # (B,N,D) heads merged, before out_proj
    attn_out: Tensor  # (B,N,D) after out_proj
    x_out: Tensor

    def merged(self, name: str) -> Tensor:
        """q, k or v with heads merged back to (B,N,D)."""
        return merge_heads(getattr(self, name))


def split_heads(t: Tensor, heads: int) -> Tensor:
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    b, h, n, dh = t.shape
    return t.transpose(1, 2).reshape(b, n, h * dh)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Explicit softmax(q kᵀ/√dh + bias)·v returning (context, probabilities)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    return probs @ v, probs


def square_size(size, what: str = "image/patch size") -> int:
    """A square size given as one int or a pair (open_clip and HF configs use both) as one int."""
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if len(set(size)) != 1:
        raise ClipXaiError(f"non-square {what} {size} is not supported", f"use a model with a square {what}")
    return int(size[0])


def keep_size_setting(value) -> bool:
    """``model.keep_size`` as a bool; anything but true/false is refused before a model is built."""
    if isinstance(value, bool):
        return value
    raise ClipXaiError(f"model.keep_size={value!r} is not true or false",
                       "set model.keep_size=false (inputs at the model's size) or true (inputs at their own size)")


def interpolate_positions(table: Tensor, n_prefix: int, grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """A ViT's learned positions (n_prefix + gh·gw, D) for a (nh, nw) patch grid: the prefix rows (class
    token) unchanged; the patch rows, laid out row-major on their (gh, gw) grid, resized bicubically
    (``align_corners=False``, no antialiasing) and flattened row-major again. This is Grad-ECLIP's
    ``clip_encode_dense`` (Cyang-Zhao/Grad-Eclip, generate_emap.py) and transformers'
    ``CLIPVisionEmbeddings.interpolate_pos_encoding``; open_clip's ``resize_pos_embed`` equals it with
    ``antialias=False`` (its default ``True`` uses another kernel). The same grid returns ``table``."""
    grid, new_grid = tuple(grid), tuple(new_grid)
    if new_grid == grid:
        return table
    d = table.shape[-1]
    patches = table[n_prefix:].reshape(1, *grid, d).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=new_grid, mode="bicubic", align_corners=False)
    return torch.cat([table[:n_prefix], patches.reshape(d, -1).transpose(0, 1)], dim=0)


_INPUT_SIZE: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("clip_xai_input_size",
                                                                                    default=None)


@contextlib.contextmanager
def input_size(pixels_or_hw):
    """Inside, :meth:`ClipAdapter.patch_map` lays token scores out on the patch grid of pixels of
    this H×W (a (B,3,H,W) tensor or an (H, W) pair) unless told otherwise. ``Explainer.__call__``
    enters it around every batch, so each method's maps follow its input's grid in keep-size mode
    without passing the pixels down."""
    hw = pixels_or_hw.shape[-2:] if isinstance(pixels_or_hw, Tensor) else pixels_or_hw
    token = _INPUT_SIZE.set((int(hw[0]), int(hw[1])))
    try:
        yield
    finally:
        _INPUT_SIZE.reset(token)


class PixelInput:
    """Mixin of the vision towers (every backend): the [0,1]-pixel normalisation with the model's own
    mean/std (``mean``/``std`` buffers, (1,3,1,1)), the input-size check and, in keep-size mode, the
    positions of any patch grid.

    Fixed mode (``keep_size`` False): pixels must be ``image_size``×``image_size``. Keep-size mode: any
    H×W whose sides are multiples of ``patch_size``; the learned positions are interpolated to the
    input's patch grid (:func:`interpolate_positions`), as Grad-ECLIP's evaluation does. At the model's
    own size both modes are the same computation.
    """

    image_size: int
    patch_size: int | None = None
    keep_size: bool = False

    def _set_pixels(self, image_size: int, mean: tuple, std: tuple, patch_size: int | None = None,
                    keep_size: bool = False) -> None:
        self.image_size = image_size
        self.patch_size = patch_size
        self.keep_size = keep_size_setting(keep_size)
        if self.keep_size and patch_size is None:
            raise ClipXaiError("model.keep_size=true needs a ViT image tower (learned positions on a patch grid); "
                               "this image tower has no patch grid",
                               "set model.keep_size=false, or use a ViT CLIP (e.g. model=vit_b16)")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def native_grid(self) -> tuple[int, int]:
        """The patch grid the learned positions were trained on (image_size / patch_size per side)."""
        g = self.image_size // self.patch_size
        return g, g

    def check_size(self, hw) -> tuple[int, int]:
        """(H, W) of an input this tower accepts, or one clear error naming the setting and the fix."""
        h, w = int(hw[0]), int(hw[1])
        if not self.keep_size:
            if (h, w) != (self.image_size, self.image_size):
                raise ClipXaiError(
                    f"this model expects {self.image_size}×{self.image_size} pixels, got {(h, w)}",
                    f"set model.image_size={self.image_size} (the dataset transform resizes to it)"
                    + ("" if self.patch_size is None else
                       ", or model.keep_size=true to run images at their own size (sides multiples of "
                       f"{self.patch_size})"),
                )
            return h, w
        p = self.patch_size
        if h < p or w < p or h % p or w % p:
            raise ClipXaiError(
                f"model.keep_size=true needs each image side to be a positive multiple of the patch size {p}, "
                f"got {h}×{w}",
                "resize with clip_xai.models.preprocess.keep_size_pixels (each side rounded to the nearest "
                "multiple of the patch size, as Grad-ECLIP's imgprocess_keepsize), or crop",
            )
        return h, w

    def grid_for(self, hw) -> tuple[int, int]:
        """The patch grid (rows, cols) of an input of size ``hw`` = (H, W) (checked as :meth:`check_size`)."""
        if self.patch_size is None:
            raise ClipXaiError("this image tower has no patch grid (it is not a ViT)",
                               "use a ViT CLIP for methods that return patch maps")
        h, w = self.check_size(hw)
        return h // self.patch_size, w // self.patch_size

    def patch_positions(self, table: Tensor, grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """The learned position table (1 + gh·gw, D), cast to ``dtype`` and then (keep-size mode, another
        grid) interpolated to ``grid``: the reference's order (cast, then interpolate)."""
        return interpolate_positions(table.to(dtype), 1, self.native_grid, grid)

    def normalise(self, pixels: Tensor) -> Tensor:
        self.check_size(pixels.shape[-2:])
        return (pixels - self.mean) / self.std


class BlockOps:
    """One transformer block decomposed as pre_attn → qkv → attention → out_proj → post_attn.

    Subclasses wrap a native block (no weight copies). ``post_attn(x, a)`` applies the residual
    of the attention output ``a`` and everything after it (MLP, norms, layer scale).
    """

    n_heads: int

    @property
    def module(self) -> nn.Module:
        """The native block this wraps (its parameters are the block's weights): the one
        ``nn.Module`` attribute of the subclass. Used by :mod:`clip_xai.models.randomise`."""
        mods = [v for v in vars(self).values() if isinstance(v, nn.Module)]
        if len(mods) != 1:
            raise TypeError(f"{type(self).__name__} must wrap exactly one native module, found {len(mods)}")
        return mods[0]

    def pre_attn(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def out_proj(self, ctx: Tensor) -> Tensor:
        raise NotImplementedError

    def post_attn(self, x: Tensor, attn_out: Tensor) -> Tensor:
        raise NotImplementedError

    def add_attn(self, x: Tensor, attn_out: Tensor) -> Tensor:
        """The attention residual alone (no MLP), e.g. CLIP Surgery's v–v path; layer scale included."""
        return x + attn_out

    def forward(self, x: Tensor, bias: Tensor | None, record: bool, heads: int | None = None):
        """Run the block; return (x_out, BlockRecord or None)."""
        heads = heads or self.n_heads
        q, k, v = (split_heads(t, heads) for t in self.qkv(self.pre_attn(x)))
        if record:
            ctx, probs = attend(q, k, v, bias)
        else:
            mask = None if bias is None else bias.to(q.dtype)
            ctx, probs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
        ctx = merge_heads(ctx)
        a = self.out_proj(ctx)
        out = self.post_attn(x, a)
        rec = BlockRecord(x, q, k, v, probs, ctx, a, out) if record else None
        return out, rec


class Tower(nn.Module):
    """A vision or text transformer run block by block (see module docstring).

    Subclasses implement ``input_embedding`` (inputs → summed embeddings, plus the additive
    attention bias) and ``embedding_norm`` when a LayerNorm precedes block 0 (together they are
    ``embed``: the hidden state before block 0), ``pool`` (final hidden states → projected embedding) and
    ``project_tokens`` (the same head applied to every token), and set ``blocks``.

    The bias is None, a shared (N, N) mask (CLIP's causal text mask) or a per-sample
    (B, 1, 1, N) padding mask (AltCLIP text); it broadcasts against (B, H, N, N) scores.
    Vision towers also hold ``mean``/``std`` (1,3,1,1) buffers: the normalisation that
    ``embed`` applies to [0,1] pixels (methods that blank pixels "to the mean colour" use them).
    A tower that cannot serve some methods (average or attention pooling, no blocks) says so in
    ``missing``; the explainer checks it at start-up.
    """

    blocks: list[BlockOps]
    width: int
    #: Attribute paths (from the tower) of the weights used before block 0 (patch or token
    #: embedding, class and position embeddings, the norm before block 0) and after the last block
    #: (final norm, pooler, projection). Model randomisation re-draws them as the stem and the head.
    stem_paths: tuple[str, ...] = ()
    head_paths: tuple[str, ...] = ()
    #: capability → why this tower lacks it (see :data:`CAPABILITIES`); empty = it has them all.
    missing: dict[str, str] = {}

    @property
    def provides(self) -> frozenset[str]:
        return frozenset(CAPABILITIES) - set(self.missing)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def n_heads(self) -> int:
        return self.blocks[0].n_heads

    def embed(self, inputs) -> tuple[Tensor, Tensor | None]:
        """(hidden state entering block 0, attention bias): :meth:`embedding_norm` of :meth:`input_embedding`."""
        e, bias = self.input_embedding(inputs)
        return self.embedding_norm(e), bias

    def input_embedding(self, inputs) -> tuple[Tensor, Tensor | None]:
        """The sum of the learned embeddings (patches or token rows, class token, positions) before
        any normalisation, and the attention bias. NIB's MFABA path starts here (``get_hs``)."""
        raise NotImplementedError

    def embedding_norm(self, e: Tensor) -> Tensor:
        """The normalisation between :meth:`input_embedding` and block 0 (identity when there is none)."""
        return e

    def token_rows(self, ids: Tensor) -> Tensor:
        """Text towers: the token-embedding table's rows for ``ids`` (B, L, D), the part of
        :meth:`input_embedding` that NIB's text RISE scales (before positions are added)."""
        raise ClipXaiError(f"{type(self).__name__} has no token-embedding table",
                           "use a text tower (explainer.modality=text)")

    def pool_index(self, inputs) -> Tensor:
        raise NotImplementedError

    def pool(self, x: Tensor, inputs) -> Tensor:
        """The embedding: :meth:`project_tokens` of each row's token at :meth:`pool_index`. Towers
        whose pooling is not a per-token head on one token (open_clip's attention/average pools,
        opaque towers) override it."""
        return self.project_tokens(x[torch.arange(x.shape[0], device=x.device), self.pool_index(inputs)])

    def project_tokens(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def part_parameters(self, part: str) -> list[nn.Parameter]:
        """The parameters of ``part`` = ``"stem"`` or ``"head"`` (see ``stem_paths``/``head_paths``),
        each tensor once, in path order; paths that are absent or None (no ``ln_pre``, no
        projection) give none."""
        out, seen = [], set()
        for path in {"stem": self.stem_paths, "head": self.head_paths}[part]:
            obj = self
            for name in path.split("."):
                obj = getattr(obj, name, None)
            params = [obj] if isinstance(obj, nn.Parameter) else list(obj.parameters()) if isinstance(obj, nn.Module) else []
            for q in params:
                if id(q) not in seen:
                    seen.add(id(q))
                    out.append(q)
        return out

    def layer(self, index: int) -> int:
        """Normalise a possibly negative block index (−1 = last block)."""
        i = index + self.n_layers if index < 0 else index
        if not 0 <= i < self.n_layers:
            raise ClipXaiError(
                f"block index {index} is out of range for a tower with {self.n_layers} blocks",
                f"choose a layer in [{-self.n_layers}, {self.n_layers - 1}]",
            )
        return i

    def run(
        self,
        x: Tensor,
        bias: Tensor | None,
        start: int = 0,
        stop: int | None = None,
        record: tuple[int, ...] | set[int] = (),
        heads: dict[int, int] | None = None,
        edits: dict[int, Edit] | None = None,
    ) -> tuple[Tensor, dict[int, BlockRecord]]:
        """Run blocks ``start..stop-1`` on hidden state ``x`` (the input of block ``start``).

        ``edits[i]`` maps the hidden state right before block ``i`` (``i == n_layers``: after
        the last block). ``heads[i]`` overrides block i's head count. ``record`` lists blocks
        whose :class:`BlockRecord` is returned.
        """
        stop = self.n_layers if stop is None else stop
        record = {self.layer(i) for i in record}
        heads = {self.layer(i): h for i, h in (heads or {}).items()}
        edits = edits or {}
        records: dict[int, BlockRecord] = {}
        for i in range(start, stop):
            if i in edits:
                x = edits[i](x)
            x, rec = self.blocks[i].forward(x, bias, i in record, heads.get(i))
            if rec is not None:
                records[i] = rec
        if stop in edits:
            x = edits[stop](x)
        return x, records

    def forward(self, inputs, **run_kwargs) -> tuple[Tensor, dict[int, BlockRecord]]:
        """Projected (not normalised) embedding of ``inputs`` and the requested records."""
        x, bias = self.embed(inputs)
        x, records = self.run(x, bias, **run_kwargs)
        return self.pool(x, inputs), records


class ClipAdapter(nn.Module):
    """A dual-encoder (image, text) model behind one interface; inputs are [0,1] pixels.

    Attributes every explainer may use: ``vision``/``text`` towers, ``image_size``,
    ``patch_size`` (None for an image tower without patches), ``grid`` (patch rows, cols at
    ``image_size``), :meth:`grid_for` (the grid of a given input), ``keep_size`` (the input mode, see
    :class:`PixelInput`), ``n_prefix`` (tokens before the patches: 1 = CLS),
    ``mask_token_id`` (what the M2IB text protocol writes into dropped tokens), ``pad_id``,
    ``text_mask_rule`` (how the faithfulness text protocol drops tokens on this backend:
    ``mask_id`` = M2IB's rule for CLIP tokenisers, ``pad_attention`` = pad + attention mask).
    """

    name: str
    vision: Tower
    text: Tower
    image_size: int
    patch_size: int | None
    n_prefix: int = 1
    mask_token_id: int = 0
    pad_id: int = 0
    text_mask_rule: str = "mask_id"
    context_length: int

    @property
    def keep_size(self) -> bool:
        """The input mode (``model.keep_size``): True = images at their own size (see :class:`PixelInput`)."""
        return bool(getattr(self.vision, "keep_size", False))

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid at the model's own size ``image_size`` (the grid of every input in fixed mode)."""
        if self.patch_size is None:
            raise ClipXaiError(f"model {self.name} has no patch grid (its image tower is not a ViT)",
                               "use a ViT CLIP for methods that return patch maps")
        g = self.image_size // self.patch_size
        return g, g

    def grid_for(self, pixels_or_hw) -> tuple[int, int]:
        """The patch grid (rows, cols) of an input: a (B,3,H,W) pixel tensor or an (H, W) pair. Equals
        :attr:`grid` in fixed mode (other sizes are refused); follows the input in keep-size mode."""
        self.grid  # noqa: B018  (one clear error for an image tower without patches)
        hw = pixels_or_hw.shape[-2:] if isinstance(pixels_or_hw, Tensor) else pixels_or_hw
        return self.vision.grid_for(hw)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def logit_scale(self) -> float:
        """The checkpoint's own factor between cosine and the logits its code returns (exp of its
        learned ``logit_scale``: 100 for the OpenAI weights)."""
        return float(self.model.logit_scale.detach().exp())

    def tokenize(self, captions: list[str]) -> TextTokens:
        raise NotImplementedError

    def token_lengths(self, captions: list[str]) -> list[int]:
        """Tokens per caption including the start/end tokens; ``tokenize`` refuses any above
        ``context_length`` (the study's long-caption policy checks this first)."""
        raise NotImplementedError

    def tokens_from_ids(self, ids: Tensor, attention_mask: Tensor | None = None) -> TextTokens:
        """Recompute pooling position and content mask for (possibly edited) ids."""
        raise NotImplementedError

    def encode_image(self, pixels: Tensor, **run_kwargs) -> Tensor:
        """Unit-norm image embeddings (B,E) of [0,1] pixels."""
        return F.normalize(self.vision(pixels, **run_kwargs)[0], dim=-1)

    def encode_text(self, tokens: TextTokens, **run_kwargs) -> Tensor:
        """Unit-norm text embeddings (B,E)."""
        return F.normalize(self.text(tokens, **run_kwargs)[0], dim=-1)

    def patch_map(self, token_scores: Tensor, pixels=None) -> Tensor:
        """(B, n_prefix + h·w) per-token scores → (B, h, w) patch grid (prefix tokens dropped).

        The grid is that of ``pixels`` (a (B,3,H,W) tensor or an (H, W) pair) when given, else of the
        size set by :func:`input_size` (``Explainer.__call__`` sets it), else :attr:`grid`.
        """
        size = pixels if pixels is not None else _INPUT_SIZE.get()
        h, w = self.grid if size is None else self.grid_for(size)
        n = token_scores.shape[1] - self.n_prefix
        if n != h * w:
            raise ClipXaiError(
                f"{n} patch scores do not fill the {h}×{w} patch grid of model {self.name}"
                + ("" if size is None else f" for {tuple(size.shape[-2:]) if isinstance(size, Tensor) else size} pixels"),
                "pass the explained pixels (model.patch_map(scores, pixels)), or call the explainer as "
                "explainer(model, pixels, tokens), which sets the input size",
            )
        return token_scores[:, self.n_prefix :].reshape(-1, h, w)
