"""Shared pieces of the information-bottleneck explainers (M2IB, METHODS.md §2.8; ABM, §2.13).

Both methods perturb the hidden state ``h`` of one tower at one depth as
``t = λ·h + (1−λ)·ε``, ``ε ~ N(0, 1)``, so each element is Gaussian with ``μ = λ·h`` and
``σ² = (1−λ)²``, and both score a token by the KL "capacity" of that element against the N(0, 1)
prior, summed over channels (``nansum``, as in YingWANGG/M2IB ``scripts/iba.py`` and the ABM
reference). This module holds the capacity, the channel reduction, the map layout and the
batching helpers (B samples × c noise copies as B·c rows, sample-major).

Padding: a caption's padding positions get no noise and no weight in any mean (they are
invisible to the real tokens: causal mask on CLIP, key-padding mask on AltCLIP), so a text map
is the same however far the ids are padded, as for the references' unpadded ids.

The other modality is fixed: an image map explains ``cos(f_I(t), f_T)`` with the detached text
embedding ``f_T``; a text map explains ``cos(f_T(t), f_I)`` with the detached image embedding.
"""
from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.explainers.base import cosine, other_target, tower_for
from clip_xai.models.base import ClipAdapter, Tower
from clip_xai.types import TextTokens

LOG_EPS = 1e-9  # added to σ² inside the log (ABM reference; keeps λ = 1, σ² = 0 finite)


def capacity(mu: Tensor, var: Tensor, log_eps: float = LOG_EPS) -> Tensor:
    """Elementwise KL(N(μ, σ²) ‖ N(0, 1)) = −½(1 + log(σ² + log_eps) − μ² − σ²).

    ``log_eps = 1e−9`` is ABM's reference; with σ² = 0 (λ = 1, nothing removed) this is
    ½(μ² − 1 − log 1e−9) ≈ ½μ² + 9.86, the *largest* value, not zero: the capped KL of a point
    mass. ``log_eps = 0`` is M2IB's reference, the exact ``log σ²`` (σ² = 0 exactly is floored at
    the smallest normal float, so the score stays finite where the reference's would be inf).
    """
    logv = torch.log(var + log_eps) if log_eps > 0 else torch.log(var.clamp_min(torch.finfo(var.dtype).tiny))
    return -0.5 * (1 + logv - mu.pow(2) - var)


def token_scores(cap: Tensor) -> Tensor:
    """(B, N, D) capacities → (B, N) per-token scores (``nansum`` over channels, as the references)."""
    return cap.nansum(dim=-1)


def layout(model: ClipAdapter, modality: str, scores: Tensor) -> Tensor:
    """Per-token scores → the raw map: (B, h, w) patch grid (prefix dropped) or (B, L) tokens."""
    return model.patch_map(scores) if modality == "image" else scores


def repeat_rows(t: Tensor, copies: int) -> Tensor:
    """(B, ...) → (B·copies, ...), each sample's copies adjacent."""
    return t.repeat_interleave(copies, dim=0)


def repeat_bias(bias: Tensor | None, batch: int, copies: int) -> Tensor | None:
    """Repeat a per-sample attention bias with the rows; a shared one (e.g. causal (L, L)) is kept.

    Layout per :class:`clip_xai.models.base.Tower`: a (B, 1, 1, L) bias (AltCLIP key padding) is
    per-sample; None or a shared (L, L) mask (CLIP's causal text mask) is kept as is.
    """
    if bias is None or bias.dim() < 3 or bias.shape[0] != batch:
        return bias
    return bias.repeat_interleave(copies, dim=0)


class Side:
    """The tower being explained, its inputs and the fixed unit target from the other modality."""

    def __init__(self, model: ClipAdapter, modality: str, pixels: Tensor, tokens: TextTokens):
        self.modality = modality
        self.tower: Tower = tower_for(model, modality)
        self.inputs = pixels if modality == "image" else tokens
        self.target = other_target(model, modality, pixels, tokens)
        self.batch = self.target.shape[0]

    def real_tokens(self, n: int) -> Tensor:
        """(B, n) bool: the positions that are part of the input (every image token; the attended
        caption tokens, padding excluded). Noise and capacity means use these only, so padding
        changes no map (the references explain unpadded ids)."""
        if self.modality == "image":
            return torch.ones(self.batch, n, dtype=torch.bool, device=self.target.device)
        return self.inputs.attention_mask.bool().to(self.target.device)

    def hidden(self, before: int) -> tuple[Tensor, Tensor | None]:
        """Detached hidden state right before block ``before`` (= output of block ``before − 1``)."""
        with torch.no_grad():
            x, bias = self.tower.embed(self.inputs)
            x, _ = self.tower.run(x, bias, stop=before)
        return x.detach(), bias

    def repeated(self, bias: Tensor | None, copies: int) -> "Repeated":
        return Repeated(self, bias, copies)


class Repeated:
    """A :class:`Side` with every sample repeated ``copies`` times (B·copies rows)."""

    def __init__(self, side: Side, bias: Tensor | None, copies: int):
        self.side = side
        self.copies = copies
        idx = torch.arange(side.batch, device=side.target.device).repeat_interleave(copies)
        inputs = side.inputs
        self.inputs = inputs.index(idx) if isinstance(inputs, TextTokens) else inputs.index_select(0, idx.to(inputs.device))
        self.target = repeat_rows(side.target, copies)
        self.bias = repeat_bias(bias, side.batch, copies)

    def similarity(self, x: Tensor, start: int) -> Tensor:
        """cos(pool(blocks start.. of x), target) for the B·copies rows, shape (B·copies,)."""
        tower = self.side.tower
        out, _ = tower.run(x, self.bias, start=start)
        return cosine(tower.pool(out, self.inputs).float(), self.target)
