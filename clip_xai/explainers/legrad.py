"""LeGrad: the gradient of each layer's image-text score with respect to that layer's attention maps.

Bousselham, Boggust, Chaybouti, Strobelt, Kuehne, "LeGrad: An Explainability Method for Vision
Transformers via Feature Formation Sensitivity", ICCV 2025; authors' package ``legrad-torch`` 1.1
(``LeWrapper.compute_legrad_clip``; METHODS.md §2.14). Written from the paper and METHODS.md's
reading of the package, not copied.

For each block l of the vision tower from ``start_layer`` to the last (reference: the last two):

* f_l: block l's output tokens read as if the network ended there ("feature formation"): the mean
  over ALL tokens, class token included, through the final norm and projection (``layer_pool:
  mean``, the reference's reading for every CLIP ViT, whatever the model itself pools), or the
  tower's own pooling head applied to them (``layer_pool: pooled``: class token, patch average or
  attentional pooler, then norm and projection; at the last block f_l is then the image embedding);
* s_l = cos(f_l, t) with t the caption's unit text embedding;
* G_l = ∂s_l/∂A_l, A_l the attention probabilities (B,H,N,N) of block l itself (s_l depends on the
  later blocks' attention not at all, and on earlier blocks' only through the residual stream,
  which LeGrad does not follow: one derivative per layer);
* m_l[j] = mean over heads and over ALL N query rows (class token included) of ReLU(G_l)[:, :, j].

Map = Σ_l m_l on the patches (prefix columns dropped). The reference upsamples each m_l
bilinearly by the patch size before summing and then min-maxes the sum; bilinear upsampling is
linear and min-max is affine, so the shared post-processing (min-max, then bilinear resize) gives
the same map up to an affine rescaling (Pearson r = 1). The cosine target matches the reference's
``text_embedding @ normalize(f_l)``; any positive logit scale would only multiply the map.

LeGrad defines no text map (the paper and the package explain images only): image maps only.
The package's variant for attention-pooled towers (SigLIP, CoCa) differentiates the POOLER's
attention instead of the blocks'; it is not implemented here. On such towers ``layer_pool: mean``
is refused at start-up (no per-token head) and ``layer_pool: pooled`` differentiates the blocks'
attention through the pooler, which is this module's method, not the package's SigLIP one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import (
    Explainer, cosine, grad_input, graph_kept, maybe_no_grad, text_target,
)
from clip_xai.models.base import ClipAdapter, Tower
from clip_xai.types import TextTokens

LAYER_POOLS = ("mean", "pooled")


class LeGrad(Explainer):
    modalities = frozenset({"image"})
    requires = {"*": frozenset({"blocks", "attention"}), "layer_pool=mean": frozenset({"token_head"})}
    differentiable = True

    def __init__(self, name: str = "legrad", modality: str = "image", start_layer: int = -2,
                 layer_pool: str = "mean"):
        super().__init__(name, modality)
        if layer_pool not in LAYER_POOLS:
            raise ClipXaiError(f"legrad layer_pool={layer_pool!r} is not known",
                               "use explainer.layer_pool=mean (the reference: all tokens) "
                               "or pooled (the tower's own pooling)")
        self.start_layer = int(start_layer)
        self.layer_pool = layer_pool

    def check_model(self, model: ClipAdapter) -> None:
        model.vision.layer(self.start_layer)

    def layer_embedding(self, tower: Tower, x: Tensor, pixels: Tensor) -> Tensor:
        """f_l (B,E): block output ``x`` (B,N,D) read through the final norm and projection."""
        if self.layer_pool == "mean":
            return tower.project_tokens(x.mean(dim=1, keepdim=True))[:, 0]
        return tower.pool(x, pixels)

    def explain_image(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        self.check_model(model)
        tower = model.vision
        first = tower.layer(self.start_layer)
        blocks = list(range(first, tower.n_layers))
        target = text_target(model, tokens)
        with maybe_no_grad():
            x, bias = tower.embed(pixels)
            x, _ = tower.run(x, bias, stop=first)
        kept = graph_kept()
        total = 0
        with torch.enable_grad():
            x = grad_input(x)  # inside keep_graph: the graph from the pixels is kept
            _, records = tower.run(x, bias, start=first, record=blocks)
            for i, b in enumerate(blocks):
                rec = records[b]
                s = cosine(self.layer_embedding(tower, rec.x_out, pixels), target)
                # Samples never interact, so the gradient of the sum is each sample's own. The graph
                # is kept for the next block's derivative (and for a second one under keep_graph).
                (g,) = torch.autograd.grad(s.sum(), [rec.probs], create_graph=kept,
                                           retain_graph=kept or i < len(blocks) - 1)
                total = total + g.clamp_min(0).mean(dim=(1, 2))  # heads, then all query rows: (B,N)
        return model.patch_map(total)
