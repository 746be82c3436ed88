"""Faithfulness metrics: does the map point at what the model actually uses? (METHODS.md §3.3–3.4)

One module per metric: :mod:`.confidence` (Confidence Drop / Increase, image and text protocols
of M2IB) and :mod:`.road` (ROAD with Noisy Linear Imputation). :class:`FaithfulnessMetrics` runs
them on a batch, on the model's device, and flags unusable maps.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import confidence as _confidence_mod
from . import road as _road_mod
from .confidence import (
    TEXT_RULES,
    content_only_tokens,
    drop_increase,
    image_confidence,
    masked_image_pixels,
    masked_text_tokens,
    pad_attention_tokens,
    resolve_text_rule,
    text_confidence,
    text_keep_mask,
)
from .road import DEFAULT_PERCENTAGES, impute, road_keep_masks, road_scores

# Result key -> True when higher is better (same as clip_xai.schema.HIGHER_IS_BETTER).
HIGHER_IS_BETTER: dict[str, bool] = {
    "conf_drop_image": _confidence_mod.HIGHER_IS_BETTER["conf_drop"],
    "conf_incr_image": _confidence_mod.HIGHER_IS_BETTER["conf_incr"],
    "conf_drop_text": _confidence_mod.HIGHER_IS_BETTER["conf_drop"],
    "conf_incr_text": _confidence_mod.HIGHER_IS_BETTER["conf_incr"],
    "road": _road_mod.HIGHER_IS_BETTER,
}

IMAGE_METRICS = ("conf_drop_image", "conf_incr_image", "road", "road_morf", "road_lerf")
TEXT_METRICS = ("conf_drop_text", "conf_incr_text")

# Bit -> name. A map holding NaN/inf gets only its "nan_*" flag.
FLAG_BITS: dict[int, str] = {1: "nan_image", 2: "constant_image", 4: "nan_text", 8: "constant_text"}
_IMAGE_BITS, _TEXT_BITS = 1 | 2, 4 | 8

__all__ = [
    "DEFAULT_PERCENTAGES", "FLAG_BITS", "HIGHER_IS_BETTER", "FaithfulnessMetrics", "TEXT_RULES",
    "content_only_tokens", "decode_flags", "drop_increase", "image_confidence", "impute", "map_flag_codes",
    "masked_image_pixels", "masked_text_tokens", "pad_attention_tokens", "resolve_text_rule",
    "road_keep_masks", "road_scores", "text_confidence", "text_keep_mask",
]


def _flag_bits(maps: Tensor, where: Tensor | None, nan_bit: int, const_bit: int) -> Tensor:
    """(B,) int64: ``nan_bit`` if a map holds NaN/inf (over ``where``), else ``const_bit`` if constant.

    A map with no entries under ``where`` (e.g. a caption without content tokens) is constant.
    Not :func:`clip_xai.metrics.sensitivity.flags.unusable_rows`: it looks only at entries under ``where``.
    """
    x = maps.flatten(1).float()
    m = torch.ones_like(x, dtype=torch.bool) if where is None else where.flatten(1).bool()
    bad = (~torch.isfinite(x) & m).any(1)
    hi = x.masked_fill(~m, float("-inf")).amax(1)
    lo = x.masked_fill(~m, float("inf")).amin(1)
    const = ~(hi > lo) & ~bad
    return bad.long() * nan_bit | const.long() * const_bit


def map_flag_codes(image_maps: Tensor | None, text_maps: Tensor | None = None,
                   content_mask: Tensor | None = None) -> Tensor:
    """(B,) int64 bitmask of :data:`FLAG_BITS`; 0 when every given map is usable."""
    ref = image_maps if image_maps is not None else text_maps
    if ref is None:
        raise ValueError("need at least one of image_maps, text_maps")
    code = torch.zeros(ref.shape[0], dtype=torch.int64, device=ref.device)
    if image_maps is not None:
        code |= _flag_bits(image_maps, None, 1, 2)
    if text_maps is not None:
        code |= _flag_bits(text_maps, content_mask, 4, 8)
    return code


def decode_flags(codes: Tensor) -> list[str]:
    """Bitmask codes → "" or names joined with "+", e.g. "constant_image+nan_text"."""
    return ["+".join(name for bit, name in FLAG_BITS.items() if c & bit) for c in codes.reshape(-1).tolist()]


class FaithfulnessMetrics:
    """Confidence Drop/Increase (image and text) and ROAD for a batch.

    ``__call__(model, pixels, tokens, image_maps=None, text_maps=None, seeds=None)`` takes [0,1]
    pixels (B,3,H,W), the caption tokens, image maps (B,H,W) min-max normalised at input
    resolution and/or text maps (B,L) over the caption tokens (``postprocess.text_maps``). It
    returns float64 (B,) tensors on the model's device under ``sim_orig`` and every
    :data:`IMAGE_METRICS` / :data:`TEXT_METRICS` key (NaN for a modality without maps, and for
    samples whose map of that modality is flagged), plus ``map_flag`` (B strings).

    Args (the yaml keys): ``percentile`` of the text protocol (50 = median, as M2IB);
    ``text_rule`` ``auto`` | ``mask_id`` | ``pad_attention`` (see :mod:`.confidence`); ``road``
    on/off; ``road_percentages``; ``road_noise`` (absolute, in normalised pixel units);
    ``road_tol`` (CG tolerance), ``road_solver`` ``auto`` | ``cg`` | ``direct``, ``road_chunk``
    (imputed images solved/encoded together).
    """

    suite = "faithfulness"

    def __init__(self, percentile: float = 50, text_rule: str = "auto", road: bool = True,
                 road_percentages: Sequence[float] = DEFAULT_PERCENTAGES, road_noise: float = 0.01,
                 road_tol: float = 1e-6, road_solver: str = "auto", road_chunk: int = 72) -> None:
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        if text_rule not in TEXT_RULES:
            raise ValueError(f"text_rule must be one of {TEXT_RULES}, got {text_rule!r}")
        percentages = [float(p) for p in road_percentages]
        if road and (not percentages or any(not 0 < p < 100 for p in percentages)):
            raise ValueError(f"road_percentages must be in (0, 100), got {list(road_percentages)}")
        if road_solver not in _road_mod.SOLVERS:
            raise ValueError(f"road_solver must be one of {_road_mod.SOLVERS}, got {road_solver!r}")
        if road_noise < 0 or road_tol <= 0 or road_chunk < 1:
            raise ValueError("road_noise must be >= 0, road_tol > 0 and road_chunk >= 1")
        self.percentile = float(percentile)
        self.text_rule = text_rule
        self.road = bool(road)
        self.road_percentages = percentages
        self.road_noise = float(road_noise)
        self.road_tol = float(road_tol)
        self.road_solver = road_solver
        self.road_chunk = int(road_chunk)

    def __repr__(self) -> str:
        return (f"FaithfulnessMetrics(percentile={self.percentile:g}, text_rule={self.text_rule!r}, road={self.road}, "
                f"road_percentages={self.road_percentages}, road_noise={self.road_noise:g}, "
                f"road_solver={self.road_solver!r})")

    def __call__(self, model, pixels: Tensor, tokens, image_maps: Tensor | None = None,
                 text_maps: Tensor | None = None, seeds: Tensor | None = None) -> dict[str, Tensor | list[str]]:
        b = pixels.shape[0]
        dev = pixels.device
        nan = torch.full((b,), float("nan"), dtype=torch.float64, device=dev)
        out: dict[str, Tensor | list[str]] = {k: nan.clone() for k in (*IMAGE_METRICS, *TEXT_METRICS)}
        with torch.no_grad():
            img_emb = model.encode_image(pixels)
            txt_emb = model.encode_text(tokens)
        s_orig = (img_emb.float() * txt_emb.float()).sum(-1)
        out["sim_orig"] = s_orig.double()
        if image_maps is not None and image_maps.dim() == 4 and image_maps.shape[1] == 1:
            image_maps = image_maps[:, 0]
        codes = torch.zeros(b, dtype=torch.int64, device=dev)
        if image_maps is not None or text_maps is not None:
            codes = map_flag_codes(image_maps, text_maps, tokens.content_mask)

        if image_maps is not None:
            usable = (codes & _IMAGE_BITS) == 0
            maps = torch.nan_to_num(image_maps.float(), nan=0.0)
            s_mask = image_confidence(model, pixels, maps, txt_emb)
            drop, incr = drop_increase(s_mask - s_orig)
            out["conf_drop_image"] = drop.masked_fill(~usable, float("nan"))
            out["conf_incr_image"] = incr.masked_fill(~usable, float("nan"))
            if self.road and bool(usable.any()):
                sel = usable.nonzero().squeeze(1)
                sub_seeds = None if seeds is None else torch.as_tensor(seeds)[sel.cpu()]
                r = road_scores(model, pixels[sel], maps[sel], txt_emb[sel], s_orig[sel],
                                percentages=self.road_percentages, noise=self.road_noise, seeds=sub_seeds,
                                chunk=self.road_chunk, tol=self.road_tol, solver=self.road_solver)
                for k in ("road", "road_morf", "road_lerf"):
                    out[k] = out[k].index_copy(0, sel, r[k].to(dev))

        if text_maps is not None:
            usable = (codes & _TEXT_BITS) == 0
            s_base, s_mask = text_confidence(model, tokens, text_maps, img_emb, self.percentile, self.text_rule)
            drop, incr = drop_increase(s_mask - s_base)
            out["conf_drop_text"] = drop.masked_fill(~usable, float("nan"))
            out["conf_incr_text"] = incr.masked_fill(~usable, float("nan"))

        out["map_flag"] = decode_flags(codes)
        return out
