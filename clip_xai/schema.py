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

# Localisation rows: one per sample (per eps when a perturbation is given). The five metrics of the
# clean map, then (NaN without a perturbation) of the perturbed map; mask_area = object pixel fraction.
LOCALISATION_METRICS = ["pointing_game", "energy_pointing_game", "relevance_mass", "relevance_rank", "mask_auroc"]
LOCALISATION_COLUMNS = ID_COLUMNS + [
    "mask", "mask_area", "perturbation", "eps",
    *LOCALISATION_METRICS, *(f"{m}_pert" for m in LOCALISATION_METRICS),
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
    # manipulation (masking check): a faithful map's top region matters; flagged maps are worse
    "mask_drop": True, "mask_drop_pert": True, "mask_flag": False, "mask_flag_pert": False,
    # randomisation: a map that passes the sanity check moves away from the original (towards 0)
    "rand_spearman": False, "rand_ssim": False, "rand_topk": False,
}

# Curve studies: curve_variant -> {AUC column -> True when higher is better}. Positive perturbation
# removes the most relevant pixels first, so a faithful map makes every curve fall fast (lower AUC);
# negative removes the least relevant first, so the curves should stay up (higher AUC).
CURVE_HIGHER_IS_BETTER: dict[str, dict[str, bool]] = {
    "positive": {c: False for c in PERTURBATION_CURVE_AUCS},
    "negative": {c: True for c in PERTURBATION_CURVE_AUCS},
}

# examples.npz arrays (n = study.save_examples, maps min-max normalised at image resolution):
#   sample_id (n,) str, caption (n,) str, image (n,H,W,3) uint8, map_clean (n,H,W) float16,
#   and for sensitivity also image_pert (n,H,W,3) uint8, map_pert (n,H,W) float16, eps (n,) float;
#   for explainers with a matrix also matrix_clean, matrix_pert (n,L,h,w) float16 (raw, caption
#   token x patch) and matrix_rows (n,L) bool (the caption's real tokens).
