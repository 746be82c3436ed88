"""Localisation study: does the map point at the object, and does it stay there under attack?

Per sample: the clean image map (from the clean-map cache, shared with the sensitivity study)
and the dataset's object mask (RIVAL10: ``metrics.mask=entire_object|merged|<attribute>``), then
the pointing game, energy-based pointing game, relevance mass and rank accuracy, the mask
AUROC and Chefer et al.'s segmentation scores (pixel accuracy, mIoU, mAP of the map thresholded at
its mean, with their pooling counts; :class:`clip_xai.metrics.localisation.LocalisationMetrics`),
plus the complexity columns. summary.json's means of the three segmentation scores are pooled the
reference's way (:func:`clip_xai.metrics.localisation.pooled_segmentation`), not row means.
With ``study.perturbed=true`` the configured perturbation is applied too and the same metrics
of the perturbed map fill the ``*_pert`` columns, so one row shows whether the explanation stays
on the object. Maps are the min-max normalised, image-size maps of every other study.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
import yaml

from clip_xai.errors import ClipXaiError
from clip_xai.paths import CONF_DIR
from clip_xai.explainers.postprocess import image_maps
from clip_xai.metrics.complexity import column_names, complexity_columns
from clip_xai.metrics.localisation import pooled_segmentation
from clip_xai.schema import LOCALISATION_COLUMNS, LOCALISATION_METRICS, SEGMENTATION_COUNTS
from clip_xai.studies.base import Prepared, RunContext, Study, to_uint8_images
from clip_xai.studies.sensitivity import clean_maps, perturb_batch

CONF_DATASETS = Path(CONF_DIR) / "dataset"


def datasets_with_masks(conf_dir: Path = CONF_DATASETS) -> list[str]:
    """Names of the ``dataset=`` options whose loader class ships object masks (``has_masks``)."""
    names = []
    for path in sorted(conf_dir.glob("*.yaml")):
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_", "")
        module, _, cls = str(target).rpartition(".")
        try:
            loader = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError, ValueError):
            continue
        if getattr(loader, "has_masks", False):
            names.append(path.stem)
    return names


class LocalisationStudy(Study):
    columns = LOCALISATION_COLUMNS
    metric_columns = ["mask_area", *LOCALISATION_METRICS, *(f"{m}_pert" for m in LOCALISATION_METRICS),
                      *column_names(), *column_names("pert")]
    metrics_suite = "localisation"

    def __init__(self, name: str = "localisation", perturbed: bool = False):
        super().__init__(name)
        self.perturbed = bool(perturbed)

    @property
    def uses_perturbation(self) -> bool:
        return self.perturbed

    def check_data(self, dataset) -> None:
        if not getattr(dataset, "has_masks", False):
            have = datasets_with_masks()
            raise ClipXaiError(
                f"study=localisation needs object masks, and dataset {type(dataset).__name__} has none",
                f"use a dataset with masks: {', '.join(f'dataset={n}' for n in have) or '(none configured)'}")

    def check(self, ctx: RunContext) -> None:
        super().check(ctx)
        self.check_data(ctx.dataset)
        if ctx.explainer.modality != "image":
            raise ClipXaiError("study=localisation scores image maps against object masks; text maps have none",
                               "use explainer.modality=image")

    def process(self, ctx: RunContext, prep: Prepared) -> tuple[list[dict], dict]:
        model, explainer, b = ctx.model, ctx.explainer, prep.batch
        size = tuple(prep.pixels.shape[-2:])
        clean = image_maps(clean_maps(ctx, prep).float(), size)
        pert = pert_pixels = None
        if self.perturbed:
            pert_pixels = perturb_batch(ctx, prep)[0].pixels  # seeded per sample, L∞ checked as in sensitivity
            pert = image_maps(explainer(model, pert_pixels, prep.tokens, prep.seeds).float(), size)
        n = len(b)
        nan = torch.full((n,), float("nan"), dtype=torch.float64, device=clean.device)
        cols: dict[str, torch.Tensor] = {c: nan for c in [*LOCALISATION_METRICS, *(f"{m}_pert" for m in LOCALISATION_METRICS),
                                                          *SEGMENTATION_COUNTS, *(f"{c}_pert" for c in SEGMENTATION_COUNTS),
                                                          "mask_area"]}
        flags = [[] for _ in range(n)]
        if b.object_masks is None:  # some sample of this batch has no mask file
            flags = [["no_mask"] for _ in range(n)]
            masks = None
        else:
            masks = b.object_masks.to(clean.device, non_blocking=True)
            for maps, suffix in ((clean, ""), (pert, "pert")):
                if maps is None:
                    continue
                scores = ctx.metrics(maps, masks, suffix)
                for f, new in zip(flags, scores.pop("map_flag")):
                    f.extend(x for x in new.split("+") if x and x not in f)
                cols.update(scores)
        cols.update(complexity_columns(clean))
        cols.update(complexity_columns(pert, "pert") if pert is not None else {c: nan for c in column_names("pert")})
        host = {k: v.double().cpu().tolist() for k, v in cols.items()}
        labels = b.labels.tolist()
        pname = ctx.perturbation.label if self.perturbed else "none"
        eps = float(ctx.perturbation.eps) if self.perturbed else float("nan")
        mask_name = getattr(ctx.dataset, "mask", None) or getattr(ctx.metrics, "mask", "")
        rows = [
            {**ctx.ids, "study": self.name, "sample_id": sid, "caption": cap, "label": labels[i], "mask": mask_name,
             "perturbation": pname, "eps": eps, **{k: v[i] for k, v in host.items()}, "map_flag": "+".join(flags[i])}
            for i, (sid, cap) in enumerate(zip(b.sample_ids, b.captions))
        ]
        k = ctx.examples_left
        if k <= 0:
            return rows, {}
        examples = {"sample_id": np.array(b.sample_ids[:k]), "caption": np.array(b.captions[:k]),
                    "image": to_uint8_images(prep.pixels[:k]), "map_clean": clean[:k].half().cpu().numpy()}
        if masks is not None:
            examples["mask"] = masks[:k].cpu().numpy()
        if pert is not None:
            examples.update(image_pert=to_uint8_images(pert_pixels[:k]), map_pert=pert[:k].half().cpu().numpy(),
                            eps=np.full(min(k, n), eps))
        return rows, examples

    def extra_summary(self, ctx: RunContext) -> dict:
        return {"localisation": {"mask": getattr(ctx.dataset, "mask", None), "perturbed": self.perturbed,
                                 "seg_threshold": getattr(ctx.metrics, "seg_threshold", None),
                                 "seg_pooling": "pixel_accuracy = sum(seg_correct) / sum(seg_labeled); miou = mean over "
                                                "bg, fg of sum(seg_inter) / sum(seg_union); mean_ap = mean(mean_ap)",
                                 "labels": getattr(ctx.dataset, "label_source", None)}}

    def pooled_means(self, frame) -> dict:
        """pixel_accuracy, miou, mean_ap (and their _pert) pooled over the rows as Chefer et al.'s
        evaluation accumulates them over the dataset."""
        return {**pooled_segmentation(frame), **pooled_segmentation(frame, "pert")}


__all__ = ["LocalisationStudy", "datasets_with_masks"]
