"""The run-directory contract shared by studies (writers) and the report (reader).

A run directory (one Hydra job) holds:
  config.yaml      the fully resolved job config (flattened with dots -> report columns)
  results.parquet  one row per (sample, eps) for sensitivity, one per sample for faithfulness
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

# Sensitivity rows: one per (sample, eps). Score directions: higher = more stable for all four
# map metrics; sim_diff is the relative similarity change (s_pert - s_orig) / s_orig.
# What the perturbation did: perturbation (its label: fgsm, pgd, noise_sign, noise_gaussian,
# map_attack, map_attack(<surrogate>)), perturbation_params (JSON of all its settings, space
# included), linf (achieved L-inf pixel change, [0,1] units), clamped (share of values its final
# [0,1] clamp changed), objective (map_attack's objective at the returned image, else NaN).
SENSITIVITY_COLUMNS = ID_COLUMNS + [
    "perturbation", "perturbation_params", "eps", "linf", "clamped", "objective",
    "sim_orig", "sim_pert", "sim_diff",
    "spearman", "ssim", "topk",
    "map_flag",  # "" if both maps are usable, else "constant_clean", "nan_pert", ... (metrics are NaN)
]

# Faithfulness rows: one per sample. conf_drop_* lower is better, conf_incr_* higher is better,
# road higher is better. NaN where the explainer lacks that modality.
FAITHFULNESS_COLUMNS = ID_COLUMNS + [
    "sim_orig",
    "conf_drop_image", "conf_incr_image", "conf_drop_text", "conf_incr_text",
    "road", "road_morf", "road_lerf",
    "map_flag",
]

# Metric name -> True when higher is better (used by reports and rankings).
HIGHER_IS_BETTER = {
    "spearman": True, "ssim": True, "topk": True, "sim_diff": False,
    "conf_drop_image": False, "conf_incr_image": True,
    "conf_drop_text": False, "conf_incr_text": True,
    "road": True,
}

# examples.npz arrays (n = study.save_examples, maps min-max normalised at image resolution):
#   sample_id (n,) str, caption (n,) str, image (n,H,W,3) uint8, map_clean (n,H,W) float16,
#   and for sensitivity also image_pert (n,H,W,3) uint8, map_pert (n,H,W) float16, eps (n,) float.
