"""Faithfulness study: does the map point at what the model actually uses? (METHODS.md §3.3–3.4)

Per sample: the image map (and, for explainers that have text maps, the text map) of the clean
pair, then Confidence Drop/Increase for each modality and ROAD for the image map
(:class:`clip_xai.metrics.faithfulness.FaithfulnessMetrics`). One row per sample; metrics of a
modality the explainer lacks are NaN.

Both maps come from the configured explainer: the image map from an instance with
``modality="image"`` and the text map from one with ``modality="text"``. The configured
``explainer.modality`` only says which of the two the explainer object was built for; the other
is a shallow copy with ``modality`` switched (:func:`with_modality`). Every setting, hence the
method, is shared, and the modality is validated against the class's ``modalities`` first. The
``modality`` column says which maps were evaluated ("image", "text" or "image+text").
"""
from __future__ import annotations

import copy

import numpy as np

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.postprocess import image_maps, text_maps
from clip_xai.metrics.complexity import column_names, complexity_columns
from clip_xai.metrics.faithfulness.confidence import resolve_text_rule
from clip_xai.schema import FAITHFULNESS_COLUMNS
from clip_xai.studies.base import Prepared, RunContext, Study, to_uint8_images


def with_modality(explainer, modality: str):
    """``explainer`` itself if it already explains ``modality``, else a shallow copy that does.

    Returns None when the explainer class has no maps of that modality.
    """
    if modality not in getattr(type(explainer), "modalities", ()):
        return None
    if getattr(explainer, "modality", None) == modality:
        return explainer
    other = copy.copy(explainer)
    other.modality = modality
    return other


class FaithfulnessStudy(Study):
    columns = FAITHFULNESS_COLUMNS
    metric_columns = ["conf_drop_image", "conf_incr_image", "conf_drop_text", "conf_incr_text",
                      "road", "road_morf", "road_lerf", "sim_orig", *column_names("image"), *column_names("text")]
    metrics_suite = "faithfulness"

    def __init__(self, name: str = "faithfulness"):
        super().__init__(name)
        self._explainers: tuple | None = None

    def explainers(self, ctx: RunContext) -> tuple:
        """(image explainer or None, text explainer or None) for ``ctx.explainer``."""
        if self._explainers is None or self._explainers[0] is not ctx.explainer:
            self._explainers = (ctx.explainer, with_modality(ctx.explainer, "image"),
                                with_modality(ctx.explainer, "text"))
        return self._explainers[1], self._explainers[2]

    def check(self, ctx: RunContext) -> None:
        super().check(ctx)
        image, text = self.explainers(ctx)
        if image is None and text is None:
            raise ClipXaiError(f"explainer {ctx.ids.get('explainer')} has neither image nor text maps",
                               "pick an explainer with image or text maps")

    def process(self, ctx: RunContext, prep: Prepared) -> tuple[list[dict], dict]:
        model = ctx.model
        image_ex, text_ex = self.explainers(ctx)
        size = tuple(prep.pixels.shape[-2:])
        img = txt = None
        if image_ex is not None:
            img = image_maps(image_ex(model, prep.pixels, prep.tokens, prep.seeds).float(), size)
        if text_ex is not None:
            txt = text_maps(text_ex(model, prep.pixels, prep.tokens, prep.seeds).float(), prep.tokens.content_mask)
        scores = ctx.metrics(model, prep.pixels, prep.tokens, img, txt, seeds=prep.seeds)
        flags = scores.pop("map_flag")
        if img is not None:
            scores.update(complexity_columns(img, "image"))
        if txt is not None:
            scores.update(complexity_columns(txt, "text", valid=prep.tokens.content_mask))
        cols = {k: v.double().cpu().tolist() for k, v in scores.items() if k in self.columns}
        modality = "+".join(m for m, e in (("image", image_ex), ("text", text_ex)) if e is not None)
        b = prep.batch
        labels = b.labels.tolist()
        rows = [
            {**ctx.ids, "study": self.name, "modality": modality, "sample_id": sid, "caption": cap,
             "label": labels[i], **{k: v[i] for k, v in cols.items()}, "map_flag": flags[i]}
            for i, (sid, cap) in enumerate(zip(b.sample_ids, b.captions))
        ]
        k = ctx.examples_left
        if img is None or k <= 0:
            return rows, {}
        examples = {
            "sample_id": np.array(b.sample_ids[:k]), "caption": np.array(b.captions[:k]),
            "image": to_uint8_images(prep.pixels[:k]), "map_clean": img[:k].half().cpu().numpy(),
        }
        return rows, examples

    def extra_summary(self, ctx: RunContext) -> dict:
        image, text = self.explainers(ctx)
        m = ctx.metrics
        rule = getattr(m, "text_rule", None)
        if text is not None and rule is not None:
            rule = resolve_text_rule(rule, ctx.model)
        return {"faithfulness": {
            "image_maps": image is not None, "text_maps": text is not None,
            "percentile": getattr(m, "percentile", None), "text_rule": rule,
            "road": getattr(m, "road", None), "road_percentages": getattr(m, "road_percentages", None),
            "road_noise": getattr(m, "road_noise", None),
        }}


__all__ = ["FaithfulnessStudy", "with_modality"]
