"""Deletion/insertion study: Grad-ECLIP's faithfulness curves on a zero-shot classifier head.

Protocol of Zhao et al. 2024 (Grad-ECLIP), ``imagenet_eval_deletion.py`` / ``imagenet_eval_insertion.py``
in Cyang-Zhao/Grad-Eclip; METHODS.md §3.5; the pixel schedule is
:mod:`clip_xai.metrics.faithfulness.deletion_insertion`. Per sample:

1. the image at its own size (the dataset's
   :meth:`~clip_xai.data.base.ImageCaptionDataset.own_size_image` of the record, decoded again:
   a file dataset's path or array, the PIL image or path given to the Python API; short side
   capped at ``max_side``), its clean zero-shot prediction over the class names × templates
   (:class:`~clip_xai.models.zeroshot.ZeroShotHead`, on the model's own preprocessing of it);
2. the map of ``prompt`` filled with the explained class (``target: gt`` = the label, ``pred`` =
   the clean top-1), computed on the image at its own size (``map_size: own``: each side rounded to a
   multiple of the patch size, the model built with ``model.keep_size=true``) or on the model's 224
   crop (``224``), min-maxed then resized bilinearly to the image size;
   ``map_size: auto`` takes ``own`` for the methods listed in ``own_size_methods`` (the reference's
   eclip, gradcam, maskclip, selfattn) and ``224`` for the others (GAME, rollout, Surgery, M2IB);
3. ``steps`` steps of ``max(1, int(area / (2·steps)))`` pixels in map order, deleted (random colours
   from a generator seeded per sample, or black) or inserted onto black; every ``eval_every`` steps
   the uint8 image is re-preprocessed and classified; top-1/5/10 hits against the label (a dataset
   without any labels, e.g. the API's in-memory images, with ``target: pred``: against the clean
   top-1, said in the summary's ``scored_against``).

Rows (:data:`clip_xai.schema.DELETION_INSERTION_COLUMNS`): one per sample, the curve as lists.
``curve_fraction`` is the schedule's nominal share of the image's pixels changed at each point
(``j·eval_every/(2·steps)``, the same for every image so curves pool; the changed count, ``int(area/(2·steps))``
per step, is below it by under one pixel per step): deletion
``[0, f₁, …, f_P]`` with the clean image first; insertion ``[f₁, …, f_P, 1]`` with the clean image last
(every pixel inserted), where the reference stores it (``top1[-1:]``); ``auc_*`` =
:func:`~clip_xai.metrics.faithfulness.deletion_insertion.curve_auc` of each curve. A constant or
non-finite map is flagged (``constant_image`` / ``nan_image``, as every faithfulness study flags maps)
and its curves are empty, AUCs NaN. ``curve_params`` (JSON, :meth:`DeletionInsertionStudy.params`)
holds every other setting that changes the measurement, so the report never pools runs that differ in one.

A sample whose dataset holds only pixels at the model's input size (the Python API given a
tensor: it has no own size) is run on those pixels instead: a warning names the count, and the
summary's ``images_at`` says ``model_input`` (or ``mixed``) with ``model_input_samples``.
"""
from __future__ import annotations

import json
import logging
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from clip_xai.data.base import load_rgb
from clip_xai.data.captions import check_policy
from clip_xai.errors import ClipXaiError
from clip_xai.explainers.postprocess import image_maps
from clip_xai.metrics.faithfulness import decode_flags, map_flag_codes
from clip_xai.metrics.faithfulness import deletion_insertion as di
from clip_xai.models.preprocess import cap_short_side, keep_size_pixels
from clip_xai.models.zeroshot import ZeroShotHead, imagenet_classnames, label_map
from clip_xai.schema import DELETION_INSERTION_COLUMNS
from clip_xai.seeds import sample_seed
from clip_xai.studies.base import Prepared, RunContext, Study

log = logging.getLogger(__name__)

TARGETS = ("gt", "pred")
MAP_SIZES = ("auto", "own", "224")
CURVE_COLUMNS = ["curve_fraction", *(f"curve_top{k}" for k in di.TOPK)]
AUC_COLUMNS = [f"auc_top{k}" for k in di.TOPK]
COLOUR_SALT = "deletion_colours"  # the colours' generator never replays the explainer's own noise


def raw_image(source) -> Image.Image:
    """The record's image as an RGB PIL image at its own size; a (3,H,W) [0,1] tensor (the API's
    in-memory pixels) is rounded to uint8 first."""
    if isinstance(source, Tensor):
        source = (source.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return load_rgb(source)


class DeletionInsertionStudy(Study):
    columns = DELETION_INSERTION_COLUMNS
    metric_columns = AUC_COLUMNS
    metrics_suite = ""  # the protocol's settings live here; any metrics group may be selected

    def __init__(self, name: str = "deletion_insertion", mode: str = "deletion", target: str = "gt",
                 steps: int = 100, eval_every: int = 10, replacement: str = "random", max_side: int | None = 640,
                 map_size: str = "auto", own_size_methods: Sequence[str] = ("eclip", "gradcam", "maskclip", "selfattn"),
                 topk: Sequence[int] = di.TOPK, classes="auto", templates="openai", prompt: str = "{}"):
        super().__init__(name)
        if mode not in di.MODES:
            raise ClipXaiError(f"study.mode={mode!r} is not known", "use study.mode=deletion or study.mode=insertion")
        if target not in TARGETS:
            raise ClipXaiError(f"study.target={target!r} is not known",
                               "use study.target=gt (explain the label) or pred (the clean top-1)")
        di.check_schedule(steps, eval_every)
        if replacement not in di.REPLACEMENTS or (mode == "insertion" and replacement != "random"):
            raise ClipXaiError(f"study.replacement={replacement!r} does not fit study.mode={mode}",
                               "deletion: study.replacement=random (the reference) or black; insertion always "
                               "inserts onto black: leave study.replacement=random")
        if max_side is not None and not (isinstance(max_side, int) and max_side >= 1):
            raise ClipXaiError(f"study.max_side={max_side!r} is not a positive integer",
                               "use study.max_side=640 (the reference) or null (no cap)")
        if str(map_size) not in MAP_SIZES:
            raise ClipXaiError(f"study.map_size={map_size!r} is not known",
                               "use study.map_size=auto (the reference's per-method choice), own or 224")
        ks = [int(k) for k in topk]
        if not ks or any(k not in di.TOPK for k in ks) or len(set(ks)) != len(ks):
            raise ClipXaiError(f"study.topk={list(topk)} must be distinct values among {list(di.TOPK)}",
                               "use study.topk=[1,5,10] (the curve_top1/5/10 columns)")
        if "{}" not in str(prompt):
            raise ClipXaiError(f"study.prompt={prompt!r} has no {{}} for the class name",
                               "use study.prompt='{}' (the bare class name) or e.g. 'a photo of a {}.'")
        self.mode, self.target, self.steps, self.eval_every = mode, target, int(steps), int(eval_every)
        self.replacement, self.max_side, self.map_size = replacement, max_side, str(map_size)
        self.own_size_methods = tuple(str(m) for m in own_size_methods)
        self.topk = sorted(ks)
        if isinstance(classes, str) and classes not in ("auto", "imagenet"):
            raise ClipXaiError(f"study.classes={classes!r} is not known",
                               "use study.classes=auto (the dataset's names), imagenet (OpenAI's 1,000) or a list: "
                               "'study.classes=[cat,dog,...]'")
        self.classes = classes if isinstance(classes, str) else [str(c) for c in (classes or [])]
        self.templates = templates if isinstance(templates, str) else [str(t) for t in templates]
        self.prompt = str(prompt)
        self.head = None  # the ZeroShotHead, built once the dataset's class names are known
        self._label_map = None  # dataset label -> head class index, when study.classes is a list of its own
        self.scored_against = "label"  # or "clean_pred": a dataset without labels, target=pred
        self.model_input_samples: list[str] = []  # samples without an own-size image (model-size pixels used)

    # -- checks -------------------------------------------------------------------------------
    def resolved_map_size(self, explainer_name: str) -> str:
        """``own`` or ``224`` for this method (``auto``: ``own`` for ``own_size_methods``)."""
        if self.map_size != "auto":
            return self.map_size
        return "own" if explainer_name in self.own_size_methods else "224"

    def check(self, ctx: RunContext) -> None:
        ctx.explainer.check_requirements(ctx.model)
        ctx.explainer.check_model(ctx.model)
        check_policy(ctx.on_long_caption)
        if ctx.explainer.modality != "image":
            raise ClipXaiError("study=deletion_insertion removes image pixels in the order of an image map",
                               "use explainer.modality=image")
        if self.resolved_map_size(ctx.explainer.name) == "own":
            self._check_keep_size(ctx.model, ctx.explainer.name)
        if ctx.dataset is not None:
            self.check_data(ctx.dataset)

    def _check_keep_size(self, model, method: str) -> None:
        if not getattr(model, "keep_size", False):
            raise ClipXaiError(
                f"study.map_size=own (the reference's choice for {method}) needs the model in keep-size mode "
                f"(positions interpolated to the image's own patch grid); model {model.name} was built without it",
                "add model.keep_size=true (a ViT open_clip model), or study.map_size=224 (maps on the 224 crop, "
                "resized to the image: the shortcut)")

    def check_data(self, dataset) -> None:
        own = list(getattr(dataset, "classnames", None) or [])
        names = (own if self.classes == "auto" else imagenet_classnames() if self.classes == "imagenet"
                 else self.classes)
        if not names:
            raise ClipXaiError(
                f"study=deletion_insertion classifies with class names, and dataset {type(dataset).__name__} has none",
                "use a dataset with classes (dataset=imagenet) or give them: study.classes=[cat,dog,...]")
        if len(names) < max(self.topk):
            raise ClipXaiError(f"study.topk={self.topk} asks for top-{max(self.topk)} of {len(names)} classes",
                               f"use study.topk with values up to {len(names)}, e.g. study.topk=[1]")
        n_labels = len(own or names)  # labels index the dataset's names (mapped onto the head's by name below)
        bad = [r.sample_id for r in dataset.records if not 0 <= int(r.label) < n_labels]
        unlabelled = len(bad) == len(dataset.records)
        if bad and (self.target == "gt" or not unlabelled):
            raise ClipXaiError(
                f"study.target={self.target} needs a class label per sample; {len(bad)} sample(s) of "
                f"{type(dataset).__name__} have none or one outside the {n_labels} classes (e.g. {bad[0]})",
                "use a dataset with labels (dataset=imagenet), or study.target=pred on a dataset without any "
                "labels (the curves are then scored against the clean top-1)")
        self.scored_against = "clean_pred" if unlabelled else "label"
        self._label_map = label_map(own, names, [int(r.label) for r in dataset.records], needs_labels=not unlabelled)
        own = getattr(dataset, "own_size_image", None)  # absent on the API's label-only stand-in
        self.model_input_samples = [] if own is None else [r.sample_id for r in dataset.records if own(r) is None]
        self.head = ZeroShotHead(list(names), self.templates)

    def params(self) -> dict:
        """Every setting besides mode and target that changes the measurement (the ``curve_params``
        column). ``map_size`` as set, not resolved per method, so that ``auto`` (the reference's
        per-method choice) keeps the methods of one sweep in one comparison; ``topk`` is left out:
        it chooses which curves are written, not their values."""
        return {"steps": self.steps, "eval_every": self.eval_every,
                "replacement": self.replacement if self.mode == "deletion" else "black_canvas",
                "max_side": self.max_side, "map_size": self.map_size,
                "own_size_methods": sorted(self.own_size_methods) if self.map_size == "auto" else None,
                "classes": self.classes if isinstance(self.classes, str) else list(self.classes),
                "n_classes": None if self.head is None else self.head.num_classes,
                "templates": self.templates if isinstance(self.templates, str) else list(self.templates),
                "prompt": self.prompt, "scored_against": self.scored_against}

    def _params_json(self) -> str:
        return json.dumps(self.params(), sort_keys=True)

    # -- one batch ----------------------------------------------------------------------------
    def empty_row(self, ctx: RunContext, sample_id: str, caption: str, label: int, flag: str) -> dict:
        row = super().empty_row(ctx, sample_id, caption, label, flag)
        row.update({c: [] for c in CURVE_COLUMNS}, curve_variant=self.mode, target=self.target,
                   curve_params=self._params_json())
        return row

    def process(self, ctx: RunContext, prep: Prepared) -> tuple[list[dict], dict]:
        records = self._records(ctx)
        b = prep.batch
        labels = b.labels.tolist()
        rows, params = [], self._params_json()
        for i, sid in enumerate(b.sample_ids):
            own = ctx.dataset.own_size_image(records[sid])  # None: only model-size pixels (counted in the summary)
            source = records[sid].image if own is None else own
            curves, flag = self.sample_curves(ctx, source, self.head_label(labels[i]), prep.seeds[i: i + 1], sid)
            rows.append({**ctx.ids, "study": self.name, "sample_id": sid, "caption": b.captions[i],
                         "label": labels[i], "curve_variant": self.mode, "target": self.target,
                         "curve_params": params, **curves,
                         "map_flag": flag})
        return rows, {}

    def head_label(self, label: int) -> int:
        """The dataset label as an index into the head's classes (mapped by name when ``study.classes`` is
        a list of its own; :func:`~clip_xai.models.zeroshot.label_map`); -1 stays -1 (no label)."""
        label = int(label)
        return label if self._label_map is None or label < 0 else int(self._label_map[label])

    def _records(self, ctx: RunContext) -> dict:
        if getattr(self, "_records_of", (None,))[0] is not ctx.dataset:
            self._records_of = (ctx.dataset, {r.sample_id: r for r in ctx.dataset.records})
            if self.model_input_samples:  # once per dataset, as its samples start
                log.warning("deletion_insertion: %d of %d sample(s) have no image at their own size (pixels given "
                            "at the model's input size, e.g. a tensor to the Python API): their curves and maps "
                            "use those pixels; pass PIL images or paths for the protocol at the image's own size",
                            len(self.model_input_samples), len(ctx.dataset.records))
        return self._records_of[1]

    def sample_curves(self, ctx: RunContext, source, label: int, seeds: Tensor, sample_id: str) -> tuple[dict, str]:
        """The curve and AUC columns of one sample, and its map flag."""
        model, device = ctx.model, ctx.device
        img = cap_short_side(raw_image(source), self.max_side)
        crop = ctx.dataset.preprocess.pixels(img)[None].to(device)
        clean_logits = self.head.image_logits(model, crop)
        explained = int(label) if self.target == "gt" else int(clean_logits.argmax(1))
        heat = self.sample_map(ctx, img, crop, explained, seeds, sample_id)
        flag = decode_flags(map_flag_codes(heat[None]))[0]  # the flag names every faithfulness study uses
        if flag:
            return {**{c: [] for c in CURVE_COLUMNS}, **{c: float("nan") for c in AUC_COLUMNS}}, flag
        image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        gen = di.colour_generator(sample_seed(int(seeds[0]), COLOUR_SALT))
        with ctx.phases.phase("curve"):
            steps, counts = di.curve_images(image, di.pixel_order(heat), self.mode, self.steps, self.eval_every,
                                            gen, self.replacement)
            pixels = torch.stack([ctx.dataset.preprocess.pixels(Image.fromarray(s.numpy())) for s in steps]).to(device)
            logits = self.head.image_logits(model, pixels)
        # the schedule's nominal share (eval point j: j·eval_every/(2·steps)), the same for every image so
        # that curves of images of different sizes pool; the changed count is int(area/(2·steps)) per step,
        # below the nominal share by under one pixel per step
        fractions = [(j + 1) * self.eval_every / (2 * self.steps) for j in range(len(counts))]
        if self.mode == "deletion":
            logits, fractions = torch.cat([clean_logits, logits]), [0.0, *fractions]
        else:
            logits, fractions = torch.cat([logits, clean_logits]), [*fractions, 1.0]
        truth = explained if self.scored_against == "clean_pred" else int(label)
        hits = di.topk_hits(logits, truth, self.topk)
        out = {"curve_fraction": fractions}
        for k in di.TOPK:
            col = hits[:, self.topk.index(k)].tolist() if k in self.topk else []
            out[f"curve_top{k}"] = col
            out[f"auc_top{k}"] = di.curve_auc(col) if col else float("nan")
        return out, ""

    def sample_map(self, ctx: RunContext, img: Image.Image, crop: Tensor, cls: int, seeds: Tensor,
                   sample_id: str) -> Tensor:
        """(H, W) min-max map of ``prompt`` with class ``cls`` at the image's size (see module docstring)."""
        model, explainer = ctx.model, ctx.explainer
        tokens = model.tokenize([self.prompt.format(self.head.class_names[cls])]).to(ctx.device)
        own = self.resolved_map_size(explainer.name) == "own"
        pixels = keep_size_pixels(img, model.patch_size)[None].to(ctx.device) if own else crop

        def compute() -> Tensor:
            return explainer(model, pixels, tokens, seeds)

        with ctx.phases.phase("clean_maps"):
            raw = compute() if ctx.cache is None else ctx.cache.get_or_compute([sample_id], compute, ctx.device)
        return image_maps(raw.float(), (img.size[1], img.size[0]))[0]

    def extra_summary(self, ctx: RunContext) -> dict:
        return {"deletion_insertion": {
            "mode": self.mode, "target": self.target, "steps": self.steps, "eval_every": self.eval_every,
            "replacement": self.replacement if self.mode == "deletion" else "black_canvas",
            "max_side": self.max_side, "map_size": self.resolved_map_size(ctx.explainer.name),
            "topk": self.topk, "classes": len(self.head.class_names) if self.head else None,
            "templates": len(self.head.templates) if self.head else None, "prompt": self.prompt,
            "scored_against": self.scored_against,
            "images_at": ("own_size" if not self.model_input_samples else "model_input"
                          if len(self.model_input_samples) == len(ctx.dataset.records) else "mixed"),
            "model_input_samples": len(self.model_input_samples),
            "auc_rule": "trapezoid over the points at unit spacing / (points - 1)",
        }}


__all__ = ["DeletionInsertionStudy", "raw_image"]
