"""The run-directory contract shared by studies (writers) and the report (reader).

A run directory (one Hydra job) holds:
  config.yaml      the fully resolved job config (flattened with dots -> report columns)
  results.parquet  one row per (sample, eps) for sensitivity and localisation, one per sample for
                   faithfulness, one per (sample, randomised state) for randomisation
  summary.json     {"study", "means": {metric: mean}, "counts": {...}, "run": {...}}
  examples.npz     a few samples for qualitative figures (see EXAMPLE_ARRAYS)
  DONE             written last; a run dir without it is incomplete (crashed or still running)
"""

RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
EXAMPLES_FILE = "examples.npz"
DONE_FILE = "DONE"

# Identity columns present in every study's rows.
ID_COLUMNS = ["sample_id", "caption", "label", "dataset", "model", "explainer", "modality", "study", "seed"]

# Columns the study loop adds to every study's rows (after its own): ``precision`` is the numerics
# the maps were computed in (fp32, tf32, bf16, fp16, fp8; ``reference`` and ``auto`` resolved), so a
# precision=auto sweep says per row what each method ran in. Older results lack them (OPTIONAL_COLUMNS).
RUN_COLUMNS = ["precision"]

# Sensitivity rows: one per (sample, eps). Score directions: higher = more stable for all four
# map metrics; sim_diff is the relative similarity change (s_pert - s_orig) / s_orig.
# What the perturbation did: perturbation (its label: fgsm, pgd, noise_sign, noise_gaussian,
# map_attack, map_attack(<surrogate>)), perturbation_params (JSON of all its settings, space
# included), linf (achieved L-inf pixel change, [0,1] units), clamped (share of values its final
# [0,1] clamp changed), objective (map_attack's objective, xshift's loss gain at the returned image,
# else NaN), sim_change (|sim_pert - sim_orig|, cosine units), pred_kept (1/0: the zero-shot top-1
# over the perturbation's class prompts is unchanged; NaN without a class-prompt set), target_mass /
# target_mass_pert (share of the clean / perturbed map's mass inside xshift's target region, else NaN).
SENSITIVITY_COLUMNS = ID_COLUMNS + [
    "perturbation", "perturbation_params", "eps", "linf", "clamped", "objective",
    "sim_change", "pred_kept", "target_mass", "target_mass_pert",
    # metrics=manipulation's masking check (NaN under metrics=sensitivity): similarity drop when the
    # map's top patches / as many random patches are masked, and the flag (1 = top region matters no
    # more than random), for the clean map and (_pert) the perturbed map on the perturbed image
    "mask_drop", "mask_drop_rand", "mask_flag", "mask_drop_pert", "mask_drop_rand_pert", "mask_flag_pert",
    "sim_orig", "sim_pert", "sim_diff",
    "spearman", "ssim", "topk",
    "matrix_spearman",  # explainers with a caption-token x image-patch matrix (interactions): Spearman of
                        # clean vs perturbed matrix over the real-token rows; NaN for the others
    "sparseness", "complexity", "sparseness_pert", "complexity_pert",  # of the clean / perturbed map
    "map_flag",  # "" if both maps are usable, else "constant_clean", "nan_pert", ... (metrics are NaN)
    "caption_flag",  # "" or "caption_truncated" (dataset.on_long_caption=truncate: `caption` is the text used)
]

# Faithfulness rows: one per sample. conf_drop_* lower is better, conf_incr_* higher is better,
# road higher is better. NaN where the explainer lacks that modality.
FAITHFULNESS_COLUMNS = ID_COLUMNS + [
    "sim_orig",
    "conf_drop_image", "conf_incr_image", "conf_drop_text", "conf_incr_text",
    "road", "road_morf", "road_lerf",
    "sparseness_image", "complexity_image", "sparseness_text", "complexity_text",
    "map_flag", "caption_flag",
]

# Localisation rows: one per sample (per eps when a perturbation is given). The eight metrics of the
# clean map, then (NaN without a perturbation) of the perturbed map; mask_area = object pixel fraction.
# The last three are Chefer et al.'s segmentation scores of this one image; the SEGMENTATION_COUNTS
# beside them pool to the reference's dataset-level numbers (pixel accuracy = Σ seg_correct /
# Σ seg_labeled; miou = mean over bg/fg of Σ seg_inter / Σ seg_union; mean_ap = mean of mean_ap):
# clip_xai.metrics.localisation.pooled_segmentation, and summary.json's means hold the pooled values.
SEGMENTATION_METRICS = ["pixel_accuracy", "miou", "mean_ap"]
SEGMENTATION_COUNTS = ["seg_correct", "seg_labeled", "seg_inter_bg", "seg_union_bg", "seg_inter_fg", "seg_union_fg"]
LOCALISATION_METRICS = ["pointing_game", "energy_pointing_game", "relevance_mass", "relevance_rank", "mask_auroc",
                        *SEGMENTATION_METRICS]
LOCALISATION_COLUMNS = ID_COLUMNS + [
    "mask", "mask_area", "perturbation", "eps",
    *LOCALISATION_METRICS, *(f"{m}_pert" for m in LOCALISATION_METRICS),
    *SEGMENTATION_COUNTS, *(f"{c}_pert" for c in SEGMENTATION_COUNTS),
    "sparseness", "complexity", "sparseness_pert", "complexity_pert",
    "map_flag",  # "empty_mask", "no_mask", "constant_clean", "nan_pert", ... (metrics NaN)
    "caption_flag",
]

# Randomisation rows: one per sample x randomised state. randomisation = cascading (units from the
# output down: head, blocks top first, stem; `unit` = the last one randomised, n_randomised of them)
# or independent (only `unit`); unit "none" / n_randomised 0 = nothing randomised (the similarities
# must be 1). unit is "head", "b<i>" or "stem"; block is the same as a number (the block index, the
# number of blocks for the head, -2 for the stem, -1 for nothing). rand_* compare the original map
# with the randomised model's map: lower = the map depends more on the weights.
RANDOMISATION_COLUMNS = ID_COLUMNS + [
    "tower", "randomisation", "block", "unit", "n_randomised", "sim_orig", "sim_rand",
    "rand_spearman", "rand_ssim", "rand_topk",
    "sparseness", "complexity", "sparseness_rand", "complexity_rand",
    "map_flag", "caption_flag",
]

# Deletion/insertion rows (Grad-ECLIP's protocol): one per sample. curve_variant = "deletion" or
# "insertion", target = "gt" (the label's map) or "pred" (the clean top-1's map); curve_fraction =
# the schedule's nominal share of the image's pixels changed at each evaluated point (deletion: 0.0 = the clean image
# first; insertion: the clean image last at 1.0, where the reference stores it); curve_top1/5/10 =
# 1/0 zero-shot top-k hits at those points (empty for a k outside study.topk or a flagged map);
# auc_top* = trapezoid over the points at unit spacing / (points - 1). Directions: CURVE_HIGHER_IS_BETTER.
# curve_params: JSON of every other setting that changes the measurement (steps, eval_every, replacement,
# max_side, map_size and own_size_methods as set, classes, templates, prompt, scored_against), a condition column.
DELETION_INSERTION_COLUMNS = ID_COLUMNS + [
    "curve_variant", "target", "curve_params", "curve_fraction", "curve_top1", "curve_top5", "curve_top10",
    "auc_top1", "auc_top5", "auc_top10",
    "map_flag",  # "" or "constant_image" / "nan_image" (curves empty, AUCs NaN), or a skipped sample's flag
    "caption_flag",
]

# Perturbation-curve rows (Chefer et al. 2021 positive/negative perturbation on a zero-shot head;
# clip_xai.metrics.faithfulness.perturbation_curve): one per sample. curve_variant "positive" (most
# relevant pixels removed first) or "negative" (least relevant first); target "gt" / "pred" (the class
# whose prompt the map explains: the label's or the clean zero-shot top-1); curve_params (JSON of
# every other setting that changes the measurement: scale, steps, ties, the label hits are counted
# against, class and template set, prompt, logit scale, AUC rule, wrong_only). curve_fraction is the
# share of the input's pixels removed at each point (point 0 = 0.0 = the clean image); curve_hit
# (1/0: top-1 == label), curve_prob_diff / curve_logit_diff (top-1 probability / logit minus the clean
# image's), curve_log_odds (log p_label / p_second) at each point (list<float64>, same length).
# auc_* = trapezoid area over curve_fraction ([0,1] units; the paper prints ×100); auc_hit also takes
# the authors' closing point (1.0, 0.0) when curve_params.close_at_one is true (the default for
# scale=per). map_flag: "" or "constant_image" / "nan_image" (curves NaN), "filtered_correct"
# (wrong_only: the clean image is classified correctly, no curve), "bad_image", ...
CURVE_COLUMNS = ["curve_fraction", "curve_hit", "curve_prob_diff", "curve_logit_diff", "curve_log_odds"]
PERTURBATION_CURVE_AUCS = ["auc_hit", "auc_prob_diff", "auc_logit_diff", "auc_log_odds"]
PERTURBATION_CURVE_COLUMNS = ID_COLUMNS + [
    "curve_variant", "target", "curve_params", *CURVE_COLUMNS, *PERTURBATION_CURVE_AUCS,
    "map_flag", "caption_flag",
]

# Columns added after the first release, with the value older results.parquet files imply.
OPTIONAL_COLUMNS = {
    "caption_flag": "", "perturbation_params": "", "precision": "", "unit": "",
    **{c: float("nan") for c in ("linf", "clamped", "objective", "matrix_spearman")},
    **{c: float("nan") for c in ("sim_change", "pred_kept", "target_mass", "target_mass_pert", "mask_drop",
                                 "mask_drop_rand", "mask_flag", "mask_drop_pert", "mask_drop_rand_pert", "mask_flag_pert")},
    **{c: float("nan") for c in ("sparseness", "complexity", "sparseness_pert", "complexity_pert", "sparseness_image",
                                 "complexity_image", "sparseness_text", "complexity_text")},
    **{f"{c}{s}": float("nan") for c in SEGMENTATION_METRICS + SEGMENTATION_COUNTS for s in ("", "_pert")},
}

# What identifies a row, beside the method (the explainer and its settings: the report's `method`).
# Rows of two methods that agree on all of these measured the same thing and are paired; rows that
# differ in any of them are never averaged together. Grouped by role:
#   SAMPLE_KEY       which sample (within a dataset)
#   SETTING_KEY      what was explained: the model and dataset, and which map (image or text)
#   CONDITION_KEYS   the study's condition of the measurement (perturbation and strength, mask,
#                    randomised tower and unit); columns a study lacks are absent from its rows
#   REPEAT_KEY       repeats of the same measurement (the seed): averaged over by the paired tests
SAMPLE_KEY = ["sample_id"]
SETTING_KEY = ["dataset", "model", "modality"]
CONDITION_KEYS = {
    "sensitivity": ["perturbation", "perturbation_params", "eps"],
    "faithfulness": [],
    "localisation": ["mask", "perturbation", "eps"],
    "randomisation": ["tower", "randomisation", "unit", "block", "n_randomised"],
    "perturbation_curve": ["curve_variant", "target", "curve_params"],
    "deletion_insertion": ["curve_variant", "target", "curve_params"],
}
REPEAT_KEY = ["seed"]


def key_columns(study: str | None = None) -> list[str]:
    """Every identifying column of a row of `study` (of any study when None), ``study`` first,
    without the method; the condition columns in schema order."""
    cond = CONDITION_KEYS[study] if study else [c for cs in CONDITION_KEYS.values() for c in cs]
    return list(dict.fromkeys(["study", *SETTING_KEY, *cond, *REPEAT_KEY, *SAMPLE_KEY]))


# Metric name -> True when higher is better (used by reports and rankings).
HIGHER_IS_BETTER = {
    "spearman": True, "ssim": True, "topk": True, "sim_diff": False, "matrix_spearman": True,
    "conf_drop_image": False, "conf_incr_image": True,
    "conf_drop_text": False, "conf_incr_text": True,
    "road": True,
    # complexity (every study with maps): sparser, less complex maps score better
    "sparseness": True, "complexity": False,
    "pointing_game": True, "energy_pointing_game": True, "relevance_mass": True, "relevance_rank": True,
    "mask_auroc": True,
    # segmentation (Chefer et al. 2021): the map thresholded at its mean against the object mask
    "pixel_accuracy": True, "miou": True, "mean_ap": True,
    # manipulation (masking check): a faithful map's top region matters; flagged maps are worse
    "mask_drop": True, "mask_drop_pert": True, "mask_flag": False, "mask_flag_pert": False,
    # randomisation: a map that passes the sanity check moves away from the original (towards 0)
    "rand_spearman": False, "rand_ssim": False, "rand_topk": False,
}

# Curve studies (perturbation_curve: Chefer et al. 2021 positive/negative perturbation;
# deletion_insertion: Grad-ECLIP deletion/insertion): one row per sample with list<float64> columns
# curve_fraction and curve_<score> of the same length, and a per-row AUC auc_<score>.
# Variant (the rows' ``curve_variant``) -> {AUC column -> True when higher is better}: removing the
# most relevant pixels first (positive, deletion) should make the score fall fast (low AUC);
# removing the least relevant first (negative) or inserting the most relevant first (insertion)
# should keep or raise it (high AUC).
CURVE_HIGHER_IS_BETTER: dict[str, dict[str, bool]] = {
    "positive": {c: False for c in PERTURBATION_CURVE_AUCS},
    "negative": {c: True for c in PERTURBATION_CURVE_AUCS},
    "deletion": {"auc_top1": False, "auc_top5": False, "auc_top10": False},
    "insertion": {"auc_top1": True, "auc_top5": True, "auc_top10": True},
}

# examples.npz arrays (n = study.save_examples, maps min-max normalised at image resolution):
#   sample_id (n,) str, caption (n,) str, image (n,H,W,3) uint8, map_clean (n,H,W) float16,
#   and for sensitivity also image_pert (n,H,W,3) uint8, map_pert (n,H,W) float16, eps (n,) float;
#   for explainers with a matrix also matrix_clean, matrix_pert (n,L,h,w) float16 (raw, caption
#   token x patch) and matrix_rows (n,L) bool (the caption's real tokens).
