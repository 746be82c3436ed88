"""GEM, Grounding Everything Module: a training-free self-self attention path beside the ViT.

Bousselham, Petersen, Ferrari, Kuehne, "Grounding Everything: Emerging Localization Properties in
Vision-Language Transformers", CVPR 2024; authors' package ``gem-torch`` 1.0.1 (``GEMWrapper``,
``SelfSelfAttention``, ``GEMResidualBlock``). Written from the paper and a reading of the package,
not copied.

The vision tower runs unchanged. Over its last ``layers`` blocks (package ``depth=7``: the last 6) a
second hidden state x_gem runs beside it, starting as the original hidden state entering the first
of them. In block b, with h = the block's pre-attention norm of the ORIGINAL hidden state and q, k,
v its per-head projections:

* τ = mean over tokens of ‖h‖ · dh^-½ per sample (``temperature: null``; a number fixes it);
* for each of p ∈ {q, k, v}: repeat ``iterations`` times p ← softmax(τ·p̂p̂ᵀ)·p̂ (p̂ = p with unit rows),
  then A_p = softmax(τ·p̂p̂ᵀ) — self-self attention, a token attends to tokens like itself;
* x_gem ← x_gem + out_proj(mean_p A_p·v) (heads merged; layer scale as the block's). No MLP on
  this path.

Map: cos(project(x_gem)[patch], t) per patch, t the caption's unit text embedding, project = the
final norm and projection applied to every token. The package min-maxes after a bilinear resize;
the shared post-processing min-maxes first, an affine difference (Pearson r = 1).

No gradient is taken, but the map is a differentiable function of the pixels (nothing is
detached under :func:`~clip_xai.explainers.base.keep_graph`), so ``map_attack`` can run through it.
Image maps only: GEM defines no text map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import Explainer, maybe_no_grad, text_target
from clip_xai.models.base import BlockRecord, BlockOps, ClipAdapter, merge_heads
from clip_xai.types import TextTokens


def self_self_context(p: Tensor, v: Tensor, inv_temp: Tensor, iterations: int) -> Tensor:
    """softmax(τ·p̂p̂ᵀ)·v after ``iterations`` self-self refinements of p (B,H,N,dh); τ is (B,1,1,1)."""
    for _ in range(iterations):
        p = F.normalize(p, dim=-1)
        p = (inv_temp * p @ p.transpose(-2, -1)).softmax(dim=-1) @ p
    p = F.normalize(p, dim=-1)
    return (inv_temp * p @ p.transpose(-2, -1)).softmax(dim=-1) @ v


class GEM(Explainer):
    modalities = frozenset({"image"})
    requires = {"*": frozenset({"blocks", "attention", "token_head"})}
    differentiable = True

    def __init__(self, name: str = "gem", modality: str = "image", layers: int = 6, iterations: int = 1,
                 temperature: float | None = None):
        super().__init__(name, modality)
        if int(layers) < 1:
            raise ClipXaiError(f"gem layers={layers} must be at least 1", "use explainer.layers=6 (the package's depth=7)")
        if int(iterations) < 0:
            raise ClipXaiError(f"gem iterations={iterations} must be 0 or more", "use explainer.iterations=1 (the package)")
        if temperature is not None and not float(temperature) > 0:
            raise ClipXaiError(f"gem temperature={temperature} must be positive or null",
                               "use explainer.temperature=null (the package: mean token norm / sqrt(head width))")
        self.layers = int(layers)
        self.iterations = int(iterations)
        self.temperature = None if temperature is None else float(temperature)

    def check_model(self, model: ClipAdapter) -> None:
        n = model.vision.n_layers
        if self.layers > n:
            raise ClipXaiError(f"gem asks for the last {self.layers} blocks of a {n}-block vision tower",
                               f"use explainer.layers={n} or less")

    def gem_residual(self, block: BlockOps, rec: BlockRecord) -> Tensor:
        """out_proj(mean over q, k, v of the self-self attention applied to v) for one block."""
        if self.temperature is None:
            h = block.pre_attn(rec.x_in)
            inv_temp = h.norm(dim=-1).mean(dim=-1)[:, None, None, None] * rec.q.shape[-1] ** -0.5
        else:
            inv_temp = torch.full((rec.q.shape[0], 1, 1, 1), self.temperature, dtype=rec.q.dtype, device=rec.q.device)
        ctx = sum(self_self_context(p, rec.v, inv_temp, self.iterations) for p in (rec.q, rec.k, rec.v)) / 3
        return block.out_proj(merge_heads(ctx))

    def explain_image(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        self.check_model(model)
        tower = model.vision
        blocks = list(range(tower.n_layers - self.layers, tower.n_layers))
        target = text_target(model, tokens)
        with maybe_no_grad():
            _, records = tower(pixels, record=blocks)
            x_gem = records[blocks[0]].x_in
            for b in blocks:
                x_gem = tower.blocks[b].add_attn(x_gem, self.gem_residual(tower.blocks[b], records[b]))
            dense = F.normalize(tower.project_tokens(x_gem), dim=-1)  # (B,N,E)
            return model.patch_map((dense * target[:, None, :]).sum(-1))
