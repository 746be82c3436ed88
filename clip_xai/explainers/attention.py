"""Shared machinery of the attention-based explainers (GAME, Chefer, rollout, Grad-ECLIP).

Everything goes through the adapter interface (:class:`~clip_xai.models.base.Tower`): a method
picks a *side* (the tower being explained, its inputs, the pooled position, and how a per-token
row becomes the returned map), asks for the attention probabilities of some blocks — with their
gradients of the cosine similarity when needed — and combines them.

Blocks before the first recorded one run under ``no_grad``; gradients start at the input of the
first recorded block, which is all any of these methods differentiates (cheaper than starting at
the pixels, identical values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import cosine, grad, grad_input, maybe_detach, maybe_no_grad
from clip_xai.models.base import BlockRecord, ClipAdapter, Tower
from clip_xai.types import TextTokens

EPS = 1e-12


@dataclass
class Side:
    """The tower explained for one modality.

    ``pool``: (B,) query row (CLS for images, EOT / ``<s>`` for text). ``to_map``: (B, N) per-token
    scores → the raw map the explainer returns ((B,h,w) patch grid, or (B,L) token scores).
    ``token_mask``: (B, N) bool, True for the tokens a map is made of (patches / all positions).
    """

    tower: Tower
    inputs: object
    pool: Tensor
    to_map: Callable[[Tensor], Tensor]
    token_mask: Callable[[int], Tensor]


def side(model: ClipAdapter, modality: str, pixels: Tensor, tokens: TextTokens) -> Side:
    """The :class:`Side` of ``modality`` (``image`` or ``text``)."""
    if modality == "image":
        tower = model.vision

        def patches(n: int) -> Tensor:
            mask = torch.zeros(pixels.shape[0], n, dtype=torch.bool, device=pixels.device)
            mask[:, model.n_prefix:] = True
            return mask

        return Side(tower, pixels, tower.pool_index(pixels), model.patch_map, patches)
    if modality == "text":
        tower = model.text

        def every(n: int) -> Tensor:
            return torch.ones(tokens.ids.shape[0], n, dtype=torch.bool, device=tokens.ids.device)

        return Side(tower, tokens, tower.pool_index(tokens), lambda t: t, every)
    raise ClipXaiError(f"unknown modality {modality!r}", "use image or text")


def blocks_from(tower: Tower, start_layer: int) -> list[int]:
    """Block indices ``start_layer .. last`` (negative counts from the end: −1 = last block only)."""
    return list(range(tower.layer(start_layer), tower.n_layers))


def similarity_from(
    s: Side, target: Tensor, first: int, record: list[int], heads: dict[int, int] | None = None
) -> tuple[Tensor, dict[int, BlockRecord]]:
    """Cosine(embedding, target) (B,) with a graph from the input of block ``first`` onward.

    Blocks ``0..first-1`` run without gradients (inside ``keep_graph``: with, from the pixels);
    ``record`` (all ≥ ``first``) are recorded.
    """
    tower = s.tower
    with maybe_no_grad():
        x, bias = tower.embed(s.inputs)
        x, _ = tower.run(x, bias, stop=first, heads=heads)
    with torch.enable_grad():
        x = grad_input(x)  # inside keep_graph: the graph from the pixels is kept
        x, records = tower.run(x, bias, start=first, record=record, heads=heads)
        return cosine(tower.pool(x, s.inputs), target), records


def attention_and_grads(
    s: Side, target: Tensor, blocks: list[int], scale: float = 1.0, heads: dict[int, int] | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Attention probabilities A_b (B,H,N,N) of ``blocks`` and ∂(scale·cos)/∂A_b, per sample.

    The gradient of ``(scale·s).sum()`` is per-sample exact (samples never interact).
    """
    sim, records = similarity_from(s, target, blocks[0], blocks, heads)
    probs = [records[b].probs for b in blocks]
    grads = grad(scale * sim, probs)
    return [maybe_detach(p) for p in probs], grads


def attention_probs(s: Side, blocks: list[int], heads: dict[int, int] | None = None) -> list[Tensor]:
    """Attention probabilities (B,H,N,N) of ``blocks`` (no gradients outside ``keep_graph``; the
    forward stops after them)."""
    with maybe_no_grad():
        _, records = s.tower(s.inputs, record=blocks, heads=heads, stop=max(blocks) + 1)
    return [records[b].probs for b in blocks]


def positive_grad_attention(probs: Tensor, grads: Tensor) -> Tensor:
    """Ā = mean over heads of clamp_min(∇A ⊙ A, 0): (B,H,N,N) → (B,N,N) (Chefer et al. 2021)."""
    return (grads * probs).clamp_min(0).mean(dim=1)


def game_relevance(cams: list[Tensor]) -> Tensor:
    """R = I, then R ← R + Ā_b·R for the blocks in forward order (Chefer et al. 2021, eq. 6)."""
    b, n, _ = cams[0].shape
    r = torch.eye(n, dtype=cams[0].dtype, device=cams[0].device).expand(b, n, n)
    for cam in cams:
        r = r + cam @ r
    return r


def rollout_joint(probs: list[Tensor]) -> Tensor:
    """J = Â_last ⋯ Â_first with Â = rownorm(mean_heads(A) + I) (Abnar & Zuidema 2020)."""
    joint = None
    for p in probs:
        a = p.mean(dim=1)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    return joint


def pooled_vector(t: Tensor, pool: Tensor) -> Tensor:
    """Token ``pool[b]`` of (B,N,D) → (B,D)."""
    return t[torch.arange(t.shape[0], device=t.device), pool]


def minmax_masked(x: Tensor, mask: Tensor) -> Tensor:
    """Per-row min-max of (B,N) ``x`` over the entries where ``mask``; other entries are kept as computed.

    A constant row becomes zeros (the span is clamped), as in the reference ``(x-min)/(max-min)``
    up to its division by zero.
    """
    lo = x.masked_fill(~mask, float("inf")).min(dim=1, keepdim=True).values
    hi = x.masked_fill(~mask, float("-inf")).max(dim=1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(EPS)
