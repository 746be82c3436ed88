"""Sensitivity study: how much does a map move under a perturbation (FGSM, PGD, noise, map attack)?

Per sample: clean map (from the clean-map cache when a sweep already computed it), perturbed
pixels, perturbed map, similarities before/after, then Spearman, SSIM, Top-K and Δs between the
min-max normalised, image-size maps. The same per-sample seed drives both maps, so RISE masks
and bottleneck noise are shared between clean and perturbed (only the image differs). Each row
also records what the perturbation achieved (``linf``, ``clamped``, ``objective``, ``sim_change``,
``pred_kept`` over the class prompts, and for X-Shift the map's mass inside its target region before
and after); a pixel-space perturbation whose ``linf`` exceeds its ε is a bug and stops the run.

Explainers whose maps are sums over a caption-token × image-patch matrix (``has_matrix``,
e.g. ``interactions``) also get ``matrix_spearman``: Spearman between the clean and perturbed
matrices over every entry of the caption's real-token rows (NaN for the other explainers). Their
clean matrices are cached beside the clean maps, and examples.npz keeps the matrices.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.postprocess import image_maps
from clip_xai.metrics.complexity import column_names, complexity_columns
from clip_xai.metrics.manipulation import COLUMNS as MASKING_COLUMNS
from clip_xai.metrics.sensitivity import spearman
from clip_xai.perturbations.base import LINF_TOL, Perturbed, achieved_linf, mass_inside
from clip_xai.schema import SENSITIVITY_COLUMNS
from clip_xai.studies.base import Prepared, RunContext, Study, to_uint8_images
from clip_xai.studies.cache import CleanMapCache


def clean_maps(ctx: RunContext, prep: Prepared, compute=None) -> torch.Tensor:
    """Raw clean maps of a batch, from the clean-map cache when the run has one (``compute``
    overrides how a missing entry is made)."""
    if compute is None:
        compute = lambda: ctx.explainer(ctx.model, prep.pixels, prep.tokens, prep.seeds)  # noqa: E731
    if ctx.cache is None:
        return compute()
    return ctx.cache.get_or_compute(prep.batch.sample_ids, compute, ctx.device)


def matrix_spearman(clean: torch.Tensor, pert: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B,) Spearman between ``clean[b]`` and ``pert[b]`` ((B, L, h, w) matrices) over every entry
    of the rows where ``rows[b]`` (B, L) is True: the caption's real tokens (padding rows are zero
    in both and would only add ties)."""
    out = [spearman(c[r].flatten()[None], p[r].flatten()[None])[0] for c, p, r in zip(clean, pert, rows.bool())]
    return torch.stack(out) if out else torch.empty(0, dtype=torch.float64)


def perturb_batch(ctx: RunContext, prep: Prepared) -> tuple[Perturbed, torch.Tensor]:
    """The batch's perturbation (seeded per sample) and its achieved L∞ per sample. A pixel-space
    perturbation that moved a pixel by more than its ε is a bug and stops the run."""
    perturbed = ctx.perturbation.perturb(ctx.model, prep.pixels, prep.tokens, prep.seeds, prep.batch.object_masks)
    linf = achieved_linf(prep.pixels, perturbed.pixels)
    bound = ctx.perturbation.linf_bound
    if bound is not None and bool((linf > bound + LINF_TOL).any()):
        raise RuntimeError(f"{ctx.perturbation.label} changed a pixel by {linf.max().item():.6g} > eps={bound:g}: "
                           "a bug in the perturbation, not in the input")
    return perturbed, linf


def achieved_columns(ctx: RunContext, image: torch.Tensor, s_orig: torch.Tensor, s_pert: torch.Tensor,
                     clean: torch.Tensor, pert: torch.Tensor, region: torch.Tensor | None) -> dict[str, list]:
    """``sim_change``, ``pred_kept`` (the zero-shot top-1 of the clean and perturbed embeddings ``image``
    (2B,E) over the perturbation's class prompts; NaN without them) and the map mass inside the
    perturbation's target region before/after (NaN without one), from the study's own forward."""
    n = len(s_orig)
    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    classes = ctx.perturbation.class_embeddings(ctx.model)
    kept = nan
    if classes is not None:
        top_clean, top_pert = (image @ classes.T).argmax(1).chunk(2)
        kept = (top_clean == top_pert).double()
    before = after = nan
    if region is not None:
        region = region.to(clean.device)
        before, after = mass_inside(clean, region), mass_inside(pert, region)
    return {k: v.double().cpu().tolist() for k, v in
            {"sim_change": (s_pert - s_orig).abs(), "pred_kept": kept,
             "target_mass": before, "target_mass_pert": after}.items()}


class SensitivityStudy(Study):
    columns = SENSITIVITY_COLUMNS
    metric_columns = ["spearman", "ssim", "topk", "matrix_spearman", "sim_diff", "sim_orig", "sim_pert", "linf", "clamped", "objective",
                      "sim_change", "pred_kept", "target_mass", "target_mass_pert", *MASKING_COLUMNS,
                      *column_names(), *column_names("pert")]
    metrics_suite = "sensitivity"
    uses_perturbation = True

    def __init__(self, name: str = "sensitivity"):
        super().__init__(name)
        self._matrix_cache: CleanMapCache | None = None

    def clean_matrices(self, ctx: RunContext, prep: Prepared) -> torch.Tensor:
        """Clean matrices of a ``has_matrix`` explainer, cached next to the clean maps."""
        compute = lambda: ctx.explainer.matrices(ctx.model, prep.pixels, prep.tokens, prep.seeds)  # noqa: E731
        if ctx.cache is None:
            return compute()
        root = Path(f"{ctx.cache.root}-matrix")
        if self._matrix_cache is None or self._matrix_cache.root != root:
            self._matrix_cache = CleanMapCache(root)
        return self._matrix_cache.get_or_compute(prep.batch.sample_ids, compute, ctx.device)

    def extra_summary(self, ctx: RunContext) -> dict:
        c = self._matrix_cache
        return {} if c is None else {"matrix_cache_hits": c.hits, "matrix_cache_misses": c.misses}

    def check(self, ctx: RunContext) -> None:
        super().check(ctx)
        if ctx.explainer.modality != "image":
            raise ClipXaiError("study=sensitivity compares image maps; explainer.modality=text has none to compare",
                               "use explainer.modality=image, or study=faithfulness for text maps")

    def process(self, ctx: RunContext, prep: Prepared) -> tuple[list[dict], dict]:
        model, explainer, phase = ctx.model, ctx.explainer, ctx.phases.phase
        mats = None
        with phase("clean_maps"):
            if explainer.has_matrix:
                clean_mat = self.clean_matrices(ctx, prep)
                clean_raw = clean_maps(ctx, prep, lambda: explainer.map_from_matrix(clean_mat, prep.tokens))
            else:
                clean_raw = clean_maps(ctx, prep)
        with phase("perturbation"):
            perturbed, linf = perturb_batch(ctx, prep)
        pert_pixels = perturbed.pixels
        with phase("perturbed_maps"):
            if explainer.has_matrix:
                pert_mat = explainer.matrices(model, pert_pixels, prep.tokens, prep.seeds)
                pert_raw = explainer.map_from_matrix(pert_mat, prep.tokens)
                mats = clean_mat.float(), pert_mat.float()
            else:
                pert_raw = explainer(model, pert_pixels, prep.tokens, prep.seeds)
        with phase("similarity"), torch.no_grad():  # one text forward, one image forward for clean and perturbed
            text = model.encode_text(prep.tokens).float()
            image = model.encode_image(torch.cat([prep.pixels, pert_pixels])).float()
            s_orig, s_pert = (image * text.repeat(2, 1)).sum(-1).chunk(2)
        with phase("metrics"):
            size = tuple(prep.pixels.shape[-2:])
            clean, pert = image_maps(clean_raw.float(), size), image_maps(pert_raw.float(), size)
            scores = ctx.metrics(clean, pert, s_orig, s_pert)
            flags = scores.pop("map_flag")
            scores.update(complexity_columns(clean), **complexity_columns(pert, "pert"))
        cols = {k: v.double().cpu().tolist() for k, v in scores.items()}
        n = len(prep.batch)
        real = prep.tokens.attention_mask.bool()
        cols["matrix_spearman"] = ([float("nan")] * n if mats is None
                                   else matrix_spearman(*mats, real.to(mats[0].device)).double().cpu().tolist())
        cols["sim_orig"], cols["sim_pert"] = s_orig.double().cpu().tolist(), s_pert.double().cpu().tolist()
        cols["linf"], cols["clamped"] = linf.double().cpu().tolist(), perturbed.clamped.double().cpu().tolist()
        cols["objective"] = [float("nan")] * n if perturbed.objective is None else perturbed.objective.double().cpu().tolist()
        cols.update(achieved_columns(ctx, image, s_orig, s_pert, clean, pert, perturbed.region))
        masking = getattr(ctx.metrics, "model_columns", None)  # metrics=manipulation's masking check
        if masking is None:
            cols.update({c: [float("nan")] * n for c in MASKING_COLUMNS})
        else:
            cols.update({k: v.double().cpu().tolist() for k, v in masking(
                model, prep.pixels, pert_pixels, text, prep.seeds, clean, pert, s_orig, s_pert).items()})
        params = ctx.perturbation.params_json()
        b = prep.batch
        labels = b.labels.tolist()
        rows = [
            {**ctx.ids, "study": self.name, "sample_id": sid, "caption": cap, "label": labels[i],
             "perturbation": ctx.perturbation.label, "perturbation_params": params, "eps": ctx.perturbation.eps,
             **{k: v[i] for k, v in cols.items()}, "map_flag": flags[i]}
            for i, (sid, cap) in enumerate(zip(b.sample_ids, b.captions))
        ]
        k = ctx.examples_left
        if k <= 0:
            return rows, {}
        examples = {
            "sample_id": np.array(b.sample_ids[:k]), "caption": np.array(b.captions[:k]),
            "image": to_uint8_images(prep.pixels[:k]), "image_pert": to_uint8_images(pert_pixels[:k]),
            "map_clean": clean[:k].half().cpu().numpy(), "map_pert": pert[:k].half().cpu().numpy(),
            "eps": np.full(min(k, len(b)), ctx.perturbation.eps),
        }
        if mats is not None:
            examples.update(matrix_clean=mats[0][:k].half().cpu().numpy(), matrix_pert=mats[1][:k].half().cpu().numpy(),
                            matrix_rows=real[:k].cpu().numpy())
        return rows, examples
