"""Perturbation-curve study: positive/negative perturbation (Chefer et al., CVPR 2021) on a zero-shot head.

Per sample: the clean image is classified by a :class:`~clip_xai.models.zeroshot.ZeroShotHead`
(class names × templates), the image map of the class prompt ``prompt.format(class)`` is computed
for the ground-truth class (``target: gt``) or the clean top-1 (``target: pred``; clean maps come
from the clean-map cache), upsampled to the input and min-maxed as the reference stores it, and the
image is classified again with the top 10%…90% of its pixels (``direction: positive``) or the bottom
ones (``negative``) set to black (:mod:`clip_xai.metrics.faithfulness.perturbation_curve`). One row
per sample holds the four curves (hit, probability and logit differences, log-odds) and their AUCs
(:data:`clip_xai.schema.PERTURBATION_CURVE_COLUMNS`).

Defaults are the reference script's (``baselines/ViT/pertubation_eval_from_hdf5.py`` with
``generate_visualizations.py``, hila-chefer/Transformer-Explainability): ``direction: negative``
(its ``--neg`` is ``type=bool, default=True``, so it is on unless given an empty string),
``scale: per``, ``target: pred`` (``--vis-class top``), hits counted against the ground truth.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from omegaconf import ListConfig

from clip_xai.errors import ClipXaiError
from clip_xai.metrics.faithfulness import decode_flags, map_flag_codes
from clip_xai.metrics.faithfulness.perturbation_curve import (CURVES, DIRECTIONS, SCALES, TIES, perturbation_curves,
                                                              reference_maps, removal_counts, removal_fractions)
from clip_xai.models.zeroshot import (SIMPLE_TEMPLATE, ZeroShotHead, check_logit_scale, imagenet_classnames,
                                      label_map, resolve_templates)
from clip_xai.schema import CURVE_COLUMNS, PERTURBATION_CURVE_AUCS, PERTURBATION_CURVE_COLUMNS
from clip_xai.studies.base import Prepared, RunContext, Study, to_uint8_images
from clip_xai.studies.faithfulness import with_modality

LABELS = ("gt", "pred")
FILTERED = "filtered_correct"


def _steps(steps) -> list[float]:
    """``study.steps`` as a list of floats, or one clear error (a scalar, a name, a nested list)."""
    try:
        if isinstance(steps, (list, tuple, ListConfig)) and not any(isinstance(s, (bool, str)) for s in steps):
            return [float(s) for s in steps]
    except (TypeError, ValueError):
        pass
    raise ClipXaiError(f"study.steps={steps!r} is not a list of numbers",
                       "use study.steps=null (the scale's nine) or a list, e.g. 'study.steps=[0.1,0.5,0.9]' "
                       "(fractions for scale=per, pixel counts for scale=100)")


def _choice(key: str, value, allowed) -> str:
    if str(value) not in allowed:
        raise ClipXaiError(f"study.{key}={value!r} is not known", f"use study.{key}=" + " or ".join(allowed))
    return str(value)


class PerturbationCurveStudy(Study):
    """Settings (``conf/study/perturbation_curve.yaml``): ``direction`` positive | negative;
    ``scale`` per | 100 and ``steps`` (null = the scale's nine; fractions for ``per``, multiples of
    100 pixels for ``100``); ``target`` gt | pred (the class whose prompt is explained); ``against``
    gt | pred (what hits and log-odds count against); ``classes`` auto (the dataset's names) |
    imagenet (OpenAI's 1,000) | a list; ``templates`` auto (OpenAI's 80 when every class is an
    OpenAI ImageNet name, else ``simple``) | openai | simple | a list; ``prompt`` (the explained
    text); ``ties`` topk | raster; ``logit_scale`` (100 or ``model``); ``close_at_one`` auto | true
    | false (the authors' (1.0, 0) point on the hit AUC; auto = true for ``scale: per``);
    ``wrong_only`` (the reference's ``--wrong``: only samples the clean image gets wrong)."""

    columns = PERTURBATION_CURVE_COLUMNS
    metric_columns = PERTURBATION_CURVE_AUCS
    metrics_suite = "perturbation_curve"

    def __init__(self, name: str = "perturbation_curve", direction: str = "negative", scale: str = "per",
                 steps=None, target: str = "pred", against: str = "gt", classes="auto", templates="auto",
                 prompt: str = SIMPLE_TEMPLATE, ties: str = "topk", logit_scale=100.0, close_at_one="auto",
                 wrong_only: bool = False):
        super().__init__(name)
        self.direction = _choice("direction", direction, DIRECTIONS)
        self.scale = _choice("scale", scale, SCALES)
        self.target = _choice("target", target, LABELS)
        self.against = _choice("against", against, LABELS)
        self.ties = _choice("ties", ties, TIES)
        self.steps = None if steps is None else _steps(steps)
        # the steps' own shape (non-empty, increasing, fractions ≤ 1 for ``per``) now; the pixel counts
        # against the dataset's image size in check_data
        removal_counts(self.scale, 224 * 224 if self.scale == "per" else 10 ** 9, self.steps)
        if "{}" not in str(prompt):
            raise ClipXaiError(f"study.prompt={prompt!r} has no {{}} for the class name",
                               "use e.g. study.prompt='a photo of a {}'")
        self.prompt = str(prompt)
        if not (classes in ("auto", "imagenet") or (isinstance(classes, (list, tuple, ListConfig))
                                                    and len(classes) >= 2)):
            raise ClipXaiError(f"study.classes={classes!r} is not a class set",
                               "use study.classes=auto (the dataset's names), imagenet (OpenAI's 1,000) or a "
                               "list of at least two names")
        self.classes = classes if isinstance(classes, str) else [str(c) for c in classes]
        if templates != "auto":
            resolve_templates(templates)  # unknown set name, a template without {}: one clear error now
        self.templates = templates if isinstance(templates, str) else [str(t) for t in templates]
        check_logit_scale(logit_scale)  # 100, a positive number or "model"
        self.logit_scale = logit_scale
        if str(close_at_one) not in ("auto", "True", "False", "true", "false"):
            raise ClipXaiError(f"study.close_at_one={close_at_one!r} is not auto, true or false",
                               "use study.close_at_one=auto (true for scale=per, as the authors' AUC)")
        self.close_at_one = (self.scale == "per") if str(close_at_one) == "auto" else str(close_at_one).lower() == "true"
        self.wrong_only = bool(wrong_only)
        if self.wrong_only and self.against == "pred":
            # hits count against the clean top-1 then, so every clean image is "correct" and every
            # sample would be filtered: empty curves, not a measurement
            raise ClipXaiError("study.wrong_only=true with study.against=pred keeps no sample (the clean "
                               "prediction is its own truth, so no clean image is wrong)",
                               "use study.against=gt with study.wrong_only=true, or study.wrong_only=false")
        self.head: ZeroShotHead | None = None
        self._label_map: torch.Tensor | None = None  # dataset label -> head class index
        self._counts: list[int] | None = None
        self._explainer: tuple | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def check_data(self, dataset) -> None:
        """Class set, head, labels and step sizes against the dataset, before the model is loaded."""
        own = list(getattr(dataset, "classnames", None) or [])
        if self.classes == "auto":
            if len(own) < 2:
                raise ClipXaiError(f"dataset {type(dataset).__name__} has no class names for the zero-shot head",
                                   "use a classification dataset (dataset=imagenet or rival10), or give the classes: "
                                   "study.classes=imagenet or 'study.classes=[cat,dog,...]'")
            names = own
        else:
            names = imagenet_classnames() if self.classes == "imagenet" else list(self.classes)
        templates = self.templates
        if templates == "auto":
            templates = "openai" if set(names) <= set(imagenet_classnames()) else "simple"
        self.head = ZeroShotHead(names, templates, logit_scale=self.logit_scale)
        self._resolved_templates = templates
        needs_labels = "gt" in (self.target, self.against)
        labels = [int(r.label) for r in dataset.records]
        if needs_labels and any(lb < 0 for lb in labels):
            raise ClipXaiError(
                f"study.target={self.target} / study.against={self.against} need class labels, "
                f"and dataset {type(dataset).__name__} has none",
                "use a labelled dataset (dataset=imagenet or rival10), or study.target=pred study.against=pred")
        self._label_map = label_map(own, names, labels, needs_labels)  # labels index the dataset's names
        size = int(getattr(dataset, "image_size", 224))
        self._n_pixels = size * size
        self._counts = removal_counts(self.scale, size * size, self.steps)
        self._fractions = [0.0] + removal_fractions(self.scale, size * size, self.steps)

    def check(self, ctx: RunContext) -> None:
        super().check(ctx)
        if self.image_explainer(ctx) is None:
            raise ClipXaiError(f"explainer {ctx.ids.get('explainer')} has no image maps",
                               "the perturbation curve removes pixels: pick an explainer with image maps")
        if self.head is None and ctx.dataset is not None:
            self.check_data(ctx.dataset)

    def image_explainer(self, ctx: RunContext):
        if self._explainer is None or self._explainer[0] is not ctx.explainer:
            self._explainer = (ctx.explainer, with_modality(ctx.explainer, "image"))
        return self._explainer[1]

    def params(self) -> dict:
        """Every setting that changes the measurement (the ``curve_params`` column, JSON)."""
        return {"scale": self.scale, "steps": self.steps, "ties": self.ties, "against": self.against,
                "classes": self.classes if isinstance(self.classes, str) else list(self.classes),
                "n_classes": None if self.head is None else self.head.num_classes,
                "templates": getattr(self, "_resolved_templates", self.templates), "prompt": self.prompt,
                "logit_scale": self.logit_scale, "close_at_one": self.close_at_one, "wrong_only": self.wrong_only}

    # -- one batch ------------------------------------------------------------------------------
    def process(self, ctx: RunContext, prep: Prepared) -> tuple[list[dict], dict]:
        model, head = ctx.model, self.head
        pixels = prep.pixels
        clean_logits = head.image_logits(model, pixels)
        pred = clean_logits.argmax(1)
        gt = prep.batch.labels.to(pred.device)
        if self._label_map is not None:
            gt = torch.where(gt >= 0, self._label_map.to(gt.device)[gt.clamp_min(0)], gt)
        explained = gt if self.target == "gt" else pred
        truth = gt if self.against == "gt" else pred
        prompts = [self.prompt.format(head.class_names[int(c)]) for c in explained.tolist()]
        tokens = model.tokenize(prompts)
        explainer = self.image_explainer(ctx)
        compute = lambda: explainer(model, pixels, tokens, prep.seeds)  # noqa: E731
        with ctx.phases.phase("clean_maps"):  # the cache key holds the study's prompt settings (cache.CACHED_STUDIES)
            raw = compute() if ctx.cache is None else ctx.cache.get_or_compute(prep.batch.sample_ids, compute, ctx.device)
        size = tuple(pixels.shape[-2:])
        maps = reference_maps(raw.detach().float(), size)
        flags = decode_flags(map_flag_codes(maps))
        keep = torch.tensor([f == "" for f in flags], device=pixels.device)
        if self.wrong_only:
            correct = (pred == truth)
            flags = [FILTERED if (f == "" and bool(c)) else f for f, c in zip(flags, correct.tolist())]
            keep &= ~correct
        n = len(flags)
        counts, fraction = self._counts, self._fractions
        if size[0] * size[1] != self._n_pixels:  # inputs at another size than the dataset's nominal one
            counts = removal_counts(self.scale, size[0] * size[1], self.steps)
            fraction = [0.0] + removal_fractions(self.scale, size[0] * size[1], self.steps)
        nan_curve = [float("nan")] * len(fraction)
        curves = {name: [nan_curve] * n for name in CURVES}
        aucs = {name: [float("nan")] * n for name in CURVES}
        idx = keep.nonzero()[:, 0]
        if len(idx):
            with ctx.phases.phase("curves"):
                res = perturbation_curves(lambda px: head.image_logits(model, px), pixels[idx], maps[idx],
                                          truth[idx], counts, self.direction, self.ties, clean_logits[idx],
                                          fraction[1:])
            for name in CURVES:
                vals, area = res.values[name].tolist(), res.auc(name, self.close_at_one).tolist()
                for j, i in enumerate(idx.tolist()):
                    curves[name][i], aucs[name][i] = vals[j], area[j]
        params = json.dumps(self.params(), sort_keys=True)
        b = prep.batch
        labels = b.labels.tolist()
        rows = [
            {**ctx.ids, "study": self.name, "modality": "image", "sample_id": sid, "caption": prompts[i],
             "label": labels[i], "curve_variant": self.direction, "target": self.target, "curve_params": params,
             "curve_fraction": list(fraction), **{f"curve_{c}": curves[c][i] for c in CURVES},
             **{f"auc_{c}": aucs[c][i] for c in CURVES}, "map_flag": flags[i]}
            for i, sid in enumerate(b.sample_ids)
        ]
        k = ctx.examples_left
        if k <= 0:
            return rows, {}
        return rows, {"sample_id": np.array(b.sample_ids[:k]), "caption": np.array(prompts[:k]),
                      "image": to_uint8_images(pixels[:k]), "map_clean": maps[:k].half().cpu().numpy()}

    def empty_row(self, ctx: RunContext, sample_id: str, caption: str, label: int, flag: str) -> dict:
        row = super().empty_row(ctx, sample_id, caption, label, flag)
        row.update({c: [] for c in CURVE_COLUMNS}, curve_variant=self.direction, target=self.target,
                   curve_params=json.dumps(self.params(), sort_keys=True), modality="image")
        return row

    def extra_summary(self, ctx: RunContext) -> dict:
        return {"perturbation_curve": {"direction": self.direction, "target": self.target,
                                       "removed_pixels": self._counts, **self.params()}}


__all__ = ["PerturbationCurveStudy"]
