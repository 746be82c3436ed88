"""The controls view: attacks set against random perturbations of the same size.

A map that moves under FGSM may move because the step was adversarial or because any change of
that size moves it. With the ``noise`` perturbation run beside the attacks (``experiment=
thesis_controls``), this view shows

* each map metric against ε per method, attacks (solid) and random controls (dashed) side by side;
* the *adversarial excess* per method × ε × metric × (attack, control): the per-sample difference
  metric(control) − metric(attack) on the samples both ran (higher metric = more stable map, so a
  positive excess means the attack moved the map more than chance did), its mean with a
  percentile-bootstrap CI, and a Wilcoxon signed-rank test, Holm-corrected within each
  (dataset, model, metric, ε);
* what each perturbation achieved: ε, achieved L∞, Δs, the share of clamped values, and the map
  attack's objective;
* the explanation shift per method (where the rows carry it: X-Shift, ``pred_kept`` on datasets
  with class names, ``metrics=manipulation``): the map's mass inside the attack's target region
  before and after and its shift (paired per row), the |Δs| achieved, the prediction-kept rate,
  and the masking check's flag rates of the clean and the perturbed maps.

A perturbation row is a control when its run's ``perturbation._target_`` is the Noise class.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from clip_xai.report import figures, stats, tables

# The random control's class (clip_xai.perturbations.noise.Noise), as a string: the report stays
# free of torch, which importing the class would load (tests check the two agree).
CONTROL_TARGET = "clip_xai.perturbations.noise.Noise"
METRICS = list(figures.SENS_METRICS)  # spearman, ssim, topk: higher = more stable
SETTING = ["dataset", "model"]
ACHIEVED = ["linf", "sim_diff", "clamped", "objective"]
#: Columns of the explanation-shift table (means per method × perturbation × ε; rates for 0/1 columns).
SHIFT = ["target_mass", "target_mass_pert", "sim_change", "pred_kept", "mask_flag", "mask_flag_pert"]


def is_control(sens: pd.DataFrame) -> pd.Series:
    """True for rows of a random control (the noise perturbation)."""
    target = sens.get("cfg.perturbation._target_")
    return pd.Series(False, index=sens.index) if target is None else target.astype(str).eq(CONTROL_TARGET)


def excess_table(sens: pd.DataFrame, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Adversarial excess (control − attack, per sample) with bootstrap CI and Holm-corrected Wilcoxon p."""
    cols = [*SETTING, "method", "eps", "metric", "attack", "control", "n", "mean_attack", "mean_control",
            "excess", "lo", "hi", "p", "p_holm", "significant"]
    control = is_control(sens)
    metrics = [m for m in METRICS if m in sens.columns and sens[m].notna().any()]
    rows = []
    for key, g in sens.groupby([*SETTING, "method", "eps"], sort=True, dropna=False):
        ctrl = g[control[g.index]]
        att = g[~control[g.index]]
        for metric in metrics:
            wide_c = ctrl.groupby(["sample_id", "perturbation"])[metric].mean().unstack("perturbation")
            wide_a = att.groupby(["sample_id", "perturbation"])[metric].mean().unstack("perturbation")
            for a in wide_a.columns:
                for c in wide_c.columns:
                    pair = pd.concat([wide_a[a].rename("a"), wide_c[c].rename("c")], axis=1, join="inner").dropna()
                    if pair.empty:
                        continue
                    diff = (pair["c"] - pair["a"]).to_numpy(float)
                    mean, lo, hi = stats.bootstrap_ci(diff, n_boot=n_boot, seed=seed)
                    rows.append({**dict(zip([*SETTING, "method", "eps"], key)), "metric": metric, "attack": a,
                                 "control": c, "n": len(pair), "mean_attack": float(pair["a"].mean()),
                                 "mean_control": float(pair["c"].mean()), "excess": mean, "lo": lo, "hi": hi,
                                 "p": stats.wilcoxon_p(diff)[1]})
    out = pd.DataFrame(rows, columns=cols)
    if out.empty:
        return out
    for _, g in out.groupby([*SETTING, "metric", "eps"], dropna=False):
        out.loc[g.index, "p_holm"] = stats.holm(g["p"])
    out["significant"] = out["p_holm"].lt(alpha)
    return out


def excess_md(table: pd.DataFrame) -> str:
    """Markdown: one section per setting × metric; cells ``excess [lo, hi]``, p_holm beside."""
    parts = []
    for key, g in table.groupby([*SETTING, "metric"], sort=True, dropna=False):
        t = g.assign(eps=g["eps"].map(tables.fmt_eps),
                     excess=tables.ci_cells(g["excess"], g["lo"], g["hi"]),
                     significant=g["significant"].map({True: "yes", False: "no"}))
        t = t[["method", "eps", "attack", "control", "n", "mean_attack", "mean_control", "excess", "p_holm",
               "significant"]]
        parts.append(f"## {' · '.join(map(str, key))}\n\n{tables.markdown(t)}")
    return ("Adversarial excess = metric under the random control − metric under the attack, per sample "
            "(higher metric = more stable map, so > 0: the attack moved the map more than noise of the same "
            "L∞ size). Mean [95% bootstrap CI]; p_holm: Wilcoxon signed-rank, Holm-corrected within each "
            "setting × metric × ε.\n\n" + "\n".join(parts))


def achieved_table(sens: pd.DataFrame) -> pd.DataFrame:
    """Per setting × perturbation × ε: rows, mean/max achieved L∞, mean Δs, clamped share, objective."""
    cols = [c for c in ACHIEVED if c in sens.columns]
    g = sens.groupby([*SETTING, "perturbation", "eps"], sort=True, dropna=False)
    out = g[cols].mean().add_prefix("mean_")
    if "linf" in cols:
        out.insert(1, "max_linf", g["linf"].max())
    out.insert(0, "rows", g.size())
    return out.reset_index()


def shift_table(sens: pd.DataFrame) -> pd.DataFrame:
    """Per setting × method × perturbation × ε: rows, mean target mass before/after, the mean paired
    shift (after − before, rows with both), mean |Δs|, prediction-kept rate and the masking check's
    flag rates (clean map, perturbed map); NaN where a perturbation has no such column."""
    cols = [c for c in SHIFT if c in sens.columns]
    g = sens.groupby([*SETTING, "method", "perturbation", "eps"], sort=True, dropna=False)
    out = g[cols].mean()
    if {"target_mass", "target_mass_pert"} <= set(cols):
        shift = (sens["target_mass_pert"] - sens["target_mass"]).rename("target_shift")
        out.insert(cols.index("target_mass_pert") + 1, "target_shift", shift.groupby(
            [sens[k] for k in [*SETTING, "method", "perturbation", "eps"]], sort=True, dropna=False).mean())
    out = out.rename(columns={"pred_kept": "kept_rate", "mask_flag": "flag_rate_clean",
                              "mask_flag_pert": "flag_rate_pert", "sim_change": "mean_abs_ds"})
    out.insert(0, "rows", g.size())
    return out.reset_index()


def has_shift_columns(sens: pd.DataFrame) -> bool:
    """True when some row carries a target mass, a kept prediction or a masking-check flag."""
    return any(c in sens.columns and sens[c].notna().any() for c in SHIFT if c != "sim_change")


def controls_curves(sens: pd.DataFrame, out_dir: Path, n_boot: int, seed: int, name: str) -> list[Path]:
    """Rows = metrics, columns = methods: mean metric vs ε per perturbation, controls dashed, 95% CI bands."""
    metrics = [m for m in METRICS if m in sens.columns and sens[m].notna().any()]
    summary = stats.summarise(sens, metrics, ["method", "perturbation", "eps"], n_boot, seed)
    methods = sorted(summary["method"].unique())
    perts = sorted(summary["perturbation"].unique())
    controls = set(sens.loc[is_control(sens), "perturbation"])
    pal = dict(zip(perts, sns.color_palette("colorblind", len(perts))))
    with sns.axes_style("whitegrid"):
        fig, axes = figures._figure(len(metrics), len(methods), 3.2, 2.6, sharey="row")
        for i, metric in enumerate(metrics):
            for j, method in enumerate(methods):
                ax = axes[i, j]
                d = summary[(summary["metric"] == metric) & (summary["method"] == method)]
                for pert, p in d.groupby("perturbation"):
                    p = p.sort_values("eps")
                    style = "--" if pert in controls else "-"
                    ax.fill_between(p["eps"], p["lo"], p["hi"], color=pal[pert], alpha=0.15, linewidth=0)
                    ax.plot(p["eps"], p["mean"], style, marker="o", color=pal[pert], label=pert, markersize=3)
                ax.set(xlabel="ε", ylabel=figures.SENS_METRICS[metric] if j == 0 else "",
                       title=method if i == 0 else "")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        by_label = dict(zip(labels, handles))
        fig.legend(by_label.values(), [f"{k} (control)" if k in controls else k for k in by_label],
                   loc="outside right upper", title="perturbation (95% CI)")
        return figures.save(fig, out_dir, name)


def controls_view(sens: pd.DataFrame, out_dir: Path, n_boot: int = 1000, seed: int = 0
                  ) -> tuple[list[tuple[str, list[Path], str]], list[tuple[str, list[Path], str]], list[str]]:
    """Figures and tables of the controls view as (title, paths, what), plus what was skipped and why."""
    figs, tabs, skipped = [], [], []
    figdir, tabdir = out_dir / "figures", out_dir / "tables"
    achieved = achieved_table(sens)
    tabs.append(("Perturbations: what they achieved",
                 tables.write(achieved, tables.markdown(achieved), tabdir, "perturbation_achieved",
                              "What each perturbation achieved (means over rows)"),
                 "rows, mean and max achieved L∞ (pixel units), mean Δs, share of clamped values and map-attack "
                 "objective per perturbation and ε"))
    if has_shift_columns(sens):
        shift = shift_table(sens)
        tabs.append(("Explanation shift and kept predictions",
                     tables.write(shift, tables.markdown(shift), tabdir, "explanation_shift",
                                  "Explanation shift, kept predictions and the masking check"),
                     "per method × perturbation × ε: map mass in X-Shift's target region before/after and the "
                     "paired shift, mean |Δs|, zero-shot top-1 kept rate, and the masking check's flag rates "
                     "(clean map, perturbed map)"))
    control = is_control(sens)
    if not control.any() or control.all():
        skipped.append("controls view (metric vs ε with random controls, adversarial excess): needs both an attack "
                       "and a random control (perturbation=noise) among the sensitivity runs; see experiment=thesis_controls")
        return figs, tabs, skipped
    for setting, g in sens.groupby(SETTING, sort=True):
        name = "controls_vs_eps" if sens.groupby(SETTING).ngroups == 1 else f"controls_vs_eps_{figures.slug(*setting)}"
        figs.append((f"Attacks vs random controls ({' · '.join(map(str, setting))})",
                     controls_curves(g, figdir, n_boot, seed, name),
                     "mean Spearman / SSIM / Top-K vs ε per method; attacks solid, random controls dashed, "
                     "shaded 95% bootstrap CI; higher = more stable"))
    excess = excess_table(sens, n_boot, seed)
    if excess.empty:
        skipped.append("adversarial excess: no attack and control share samples at the same method and ε")
    else:
        tabs.append(("Adversarial excess", tables.write(excess, excess_md(excess), tabdir, "adversarial_excess",
                                                        "Adversarial excess (control − attack)"),
                     "per-sample metric under the random control minus under the attack, mean with 95% bootstrap "
                     "CI and Holm-corrected Wilcoxon p, per method × ε × (attack, control)"))
    return figs, tabs, skipped
