"""Randomisation suite: how similar is a map to the map of the same input under randomised weights?

The model-randomisation sanity check (Adebayo et al. 2018) compares the original map with the map
of a model whose blocks were re-initialised. It reuses the sensitivity family's similarity
measures (:mod:`clip_xai.metrics.sensitivity`): Spearman ρ, SSIM and Top-K intersection between
the two min-max maps. Here *lower* is better: a method that explains the model must change when
the model does (Adebayo et al. report the similarity falling towards 0 as blocks are randomised).

Text maps (per caption token) get Spearman ρ over the caption tokens and Top-K with
``K = min(text_k, caption tokens)``; SSIM is an image measure and is NaN for them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.metrics.sensitivity import spearman, ssim, topk_intersection
from clip_xai.metrics.sensitivity.flags import decode_flags, map_flag_codes

HIGHER_IS_BETTER: dict[str, bool] = {"rand_spearman": False, "rand_ssim": False, "rand_topk": False}

__all__ = ["HIGHER_IS_BETTER", "RandomisationMetrics"]


class RandomisationMetrics:
    """``__call__(orig, rand, valid=None)`` → float64 (B,) ``rand_spearman``, ``rand_ssim``, ``rand_topk``
    and ``map_flag`` (B strings: ``constant_orig``, ``nan_rand``, ...; the metrics are NaN there).

    Image maps are (B, H, W); text maps are (B, L) with ``valid`` = the caption-token mask.
    """

    suite = "randomisation"

    def __init__(self, k: int = 100, text_k: int = 3, ssim_chunk: int = 64) -> None:
        if k < 1 or text_k < 1 or ssim_chunk < 1:
            raise ValueError(f"k, text_k and ssim_chunk must be >= 1, got {k}, {text_k}, {ssim_chunk}")
        self.k, self.text_k, self.ssim_chunk = int(k), int(text_k), int(ssim_chunk)

    def __repr__(self) -> str:
        return f"RandomisationMetrics(k={self.k}, text_k={self.text_k})"

    def __call__(self, orig: Tensor, rand: Tensor, valid: Tensor | None = None) -> dict[str, Tensor | list[str]]:
        if orig.shape != rand.shape:
            raise ValueError(f"map shapes differ: {tuple(orig.shape)} vs {tuple(rand.shape)}")
        if valid is None:
            out = {"rand_spearman": spearman(orig, rand), "rand_ssim": ssim(orig, rand, chunk=self.ssim_chunk),
                   "rand_topk": topk_intersection(orig, rand, k=min(self.k, orig[0].numel()))}
            codes = map_flag_codes(orig, rand)
        else:
            out, codes = self._text(orig, rand, valid.to(torch.bool))
        unusable = codes != 0
        for name in HIGHER_IS_BETTER:
            out[name] = out[name].masked_fill(unusable, float("nan"))
        out["map_flag"] = [f.replace("clean", "orig").replace("pert", "rand") for f in decode_flags(codes)]
        return out

    def _text(self, orig: Tensor, rand: Tensor, valid: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Per caption (lengths differ): Spearman and Top-K over its caption tokens."""
        b = orig.shape[0]
        rho = torch.full((b,), float("nan"), dtype=torch.float64, device=orig.device)
        top = rho.clone()
        codes = torch.zeros(b, dtype=torch.int64, device=orig.device)
        for i in range(b):
            x, y = orig[i][valid[i]][None], rand[i][valid[i]][None]
            if x.shape[1] == 0:
                codes[i] = 2 | 8  # no caption tokens: nothing to compare
                continue
            codes[i] = map_flag_codes(x, y)[0]
            rho[i] = spearman(x, y)[0]
            top[i] = topk_intersection(x, y, k=min(self.text_k, x.shape[1]))[0]
        return {"rand_spearman": rho, "rand_ssim": torch.full_like(rho, float("nan")), "rand_topk": top}, codes
