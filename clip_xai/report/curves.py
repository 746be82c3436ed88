"""Report section of the faithfulness curves: positive/negative perturbation (Chefer et al. 2021,
``study=perturbation_curve``) and deletion/insertion (Grad-ECLIP, Zhao et al. 2024,
``study=deletion_insertion``).

Each row holds one sample's curve: ``curve_fraction`` (the removed or inserted fraction at each
point, point 0 = the clean image) and one list column ``curve_<score>`` per score, plus the row's
AUC ``auc_<score>``. The section draws, per setting (dataset · model) and study, the mean score
against the fraction, one curve per method with its 95% bootstrap band (samples resampled whole,
the same draws at every point), one panel per variant × target and one row of panels per score;
and a table of the mean AUC per method with its 95% bootstrap CI. The AUCs' paired Wilcoxon tests
and ranks are those of the report's ``wilcoxon`` and ``ranks`` tables (families keep each
variant and target apart; the direction of better comes from schema.CURVE_HIGHER_IS_BETTER).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clip_xai.errors import ClipXaiError
from clip_xai.report import figures, stats, tables
from clip_xai.report.bands import band_grid
from clip_xai.report.collect import random_weight_models
from clip_xai.report.contents import Item, Report
from clip_xai.schema import CONDITION_KEYS

SETTING = ["dataset", "model"]
CONDITION = ["study", "curve_variant", "target"]  # always; plus the study's other CONDITION_KEYS (condition())
FRACTION = "curve_fraction"
#: The score drawn first (and the overview's headline) of each study, when its rows carry it.
HEADLINE_SCORE = {"perturbation_curve": "hit", "deletion_insertion": "top1"}


POINTS_NOTE = ("One row per setting × study × variant × target × method × score × point: the fraction, the "
               "samples with a whole curve (n), the mean and its 95% bootstrap band (lo, hi). The data behind "
               "the curve figures: see the CSV beside this file.\n")


def condition(rows: pd.DataFrame) -> list[str]:
    """The condition columns of curve rows: study, variant, target, then any other condition column
    the studies' schema names (e.g. a settings column) that the rows carry."""
    extra = [c for s in rows["study"].unique() for c in CONDITION_KEYS.get(s, [])]
    return list(dict.fromkeys([*CONDITION, *(c for c in extra if c in rows.columns)]))


def _per_study(rows: pd.DataFrame, fn) -> pd.DataFrame:
    """``fn(rows of one study, its condition columns)`` for each study, concatenated."""
    parts = [fn(g, condition(g)) for _, g in rows.groupby("study", sort=True)]
    return pd.concat(parts, ignore_index=True) if parts else fn(rows, condition(rows))


def scores(rows: pd.DataFrame) -> list[str]:
    """Score names of the list columns ``curve_<score>`` that hold a curve in some row (not the
    fraction, not a condition column such as ``curve_variant``)."""
    def is_curve(col: pd.Series) -> bool:  # a list column with at least one non-empty curve
        return any(not _missing(v) for v in col if isinstance(v, (list, tuple, np.ndarray)))

    out = [c.removeprefix("curve_") for c in rows.columns
           if c.startswith("curve_") and c != FRACTION and c not in condition(rows) and is_curve(rows[c])]
    first = [s for s in HEADLINE_SCORE.values() if s in out]
    return [*first, *sorted(s for s in out if s not in first)]


def _missing(v) -> bool:
    """No curve: None, NaN, or a zero-length list (a flagged map, a score left out of ``study.topk``,
    a skipped sample; those are counted by ``map_flag``, not errors)."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return True
    return isinstance(v, (list, tuple, np.ndarray)) and len(v) == 0


def _matrix(values: pd.Series, n_points: int, what: str) -> np.ndarray:
    """Stack one list column into (rows × points); a missing curve (see :func:`_missing`) is a row of NaN."""
    out = np.full((len(values), n_points), np.nan)
    for i, v in enumerate(values):
        if _missing(v):
            continue
        a = np.asarray(v, float)
        if a.shape != (n_points,):
            raise ClipXaiError(f"{what}: a curve has {a.size} points where its curve_fraction has {n_points}",
                               "re-run that job: its results.parquet does not follow the curve schema")
        out[i] = a
    return out


def _fraction(g: pd.DataFrame, what: str) -> np.ndarray:
    """The group's common ``curve_fraction`` (every row must have the same points)."""
    fr = [np.asarray(v, float) for v in g[FRACTION] if not _missing(v)]
    if not fr:
        raise ClipXaiError(f"{what}: no row has a curve_fraction", "re-run that job with this clip-xai version")
    if any(f.shape != fr[0].shape or not np.allclose(f, fr[0]) for f in fr[1:]):
        runs = ", ".join(sorted(g["run_dir"].astype(str).unique())[:3]) if "run_dir" in g.columns else "?"
        raise ClipXaiError(f"{what}: rows hold curves on different fractions (runs {runs})",
                           "report runs with different step settings separately (one call each)")
    return fr[0]


def summary(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Long table: setting × study × variant × target (× other conditions) × method × score × point,
    with the fraction, n (samples with a whole curve), mean and the 95% bootstrap band lo/hi.
    Repeats (seeds) of a sample are averaged first, so the band resamples samples."""
    return _per_study(rows, lambda g, cond: _summary(g, cond, n_boot, seed))


def _summary(rows: pd.DataFrame, cond: list[str], n_boot: int, seed: int) -> pd.DataFrame:
    keys = [*SETTING, *cond, "method"]
    out = []
    for key, g in rows.groupby(keys, sort=True, dropna=False):
        what = " · ".join(map(str, key))
        frac = _fraction(g, what)
        for score in scores(g):
            m = _matrix(g[f"curve_{score}"], len(frac), what)
            m = pd.DataFrame(m).groupby(g["sample_id"].to_numpy(), sort=True).mean().to_numpy()
            n = int((~np.isnan(m).any(axis=1)).sum())
            mean, lo, hi = stats.bootstrap_rows(m, n_boot=n_boot, seed=seed)
            for k, f in enumerate(frac):
                out.append({**dict(zip(keys, key)), "score": score, "point": k, "fraction": float(f), "n": n,
                            "mean": mean[k], "lo": lo[k], "hi": hi[k]})
    return pd.DataFrame(out, columns=[*keys, "score", "point", "fraction", "n", "mean", "lo", "hi"])


def auc_summary(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean AUC per setting × study × variant × target (× other conditions) × method and AUC column,
    with its 95% bootstrap CI (over samples, repeats averaged) and the direction of better (None if
    unknown)."""
    return _per_study(rows, lambda g, cond: _auc_summary(g, cond, n_boot, seed))


def _auc_summary(rows: pd.DataFrame, cond: list[str], n_boot: int, seed: int) -> pd.DataFrame:
    aucs = [c for c in rows.columns if c.startswith("auc_") and rows[c].notna().any()]
    keys = [*SETTING, *cond, "method"]
    out = []
    for key, g in rows.groupby(keys, sort=True, dropna=False):
        fam = dict(zip(keys, key))
        per_sample = g.groupby("sample_id", sort=True)[aucs].mean()
        for a in aucs:
            mean, lo, hi = stats.bootstrap_ci(per_sample[a].to_numpy(float), n_boot=n_boot, seed=seed)
            out.append({**fam, "metric": a, "higher_is_better": stats.higher_is_better(a, fam),
                        "n": int(per_sample[a].notna().sum()), "mean": mean, "lo": lo, "hi": hi})
    return pd.DataFrame(out, columns=[*keys, "metric", "higher_is_better", "n", "mean", "lo", "hi"])


def auc_md(auc: pd.DataFrame) -> str:
    """Markdown: one section per setting × study × variant × target; rows = methods, cells
    ``mean [lo, hi]``, the best mean in bold (honouring the variant's direction)."""
    parts = []
    for key, g in auc.groupby([*SETTING, *condition(auc)], sort=True, dropna=False):
        cols, bold = {}, {}
        for metric, m in g.groupby("metric", sort=False):
            hib = m["higher_is_better"].iloc[0]
            head = f"{metric} {tables.ARROW[bool(hib)]}" if hib is not None and not pd.isna(hib) else f"{metric} (direction unknown)"
            cols[head] = pd.Series(tables.ci_cells(m["mean"], m["lo"], m["hi"]), index=m["method"].to_numpy())
            if hib is not None and not pd.isna(hib) and m["mean"].notna().any():
                best = m.loc[m["mean"].idxmax() if hib else m["mean"].idxmin(), "method"]
                bold[head] = best
        t = pd.DataFrame(cols)
        t = t.map(str)
        for head, best in bold.items():
            t.loc[best, head] = f"**{t.loc[best, head]}**"
        t.index.name = "method"
        dataset, model, study, variant, target, *other = key
        n = int(g["n"].max())
        more = "".join(f" · {c}={v}" for c, v in zip(condition(auc)[3:], other) if not pd.isna(v))
        parts.append(f"## {study} · {variant} · target={target} · {dataset} · {model}{more} (n ≤ {n})\n\n"
                     f"{tables.markdown(t, index=True)}")
    return ("Area under each sample's curve (score against the removed or inserted fraction), mean over "
            "samples with a 95% bootstrap CI; best mean in bold. Positive perturbation and deletion remove "
            "the most relevant pixels first (a faithful map: the score falls fast, lower AUC ↓); negative "
            "perturbation removes the least relevant first and insertion adds the most relevant first "
            "(higher AUC ↑). Paired Wilcoxon tests of the AUCs: the `wilcoxon` table.\n\n" + "\n".join(parts))


def figure(s: pd.DataFrame, out_dir: Path, name: str, pal: dict | None = None, note: str = "") -> list[Path]:
    """Rows = scores, columns = variant × target: mean score against the fraction per method, 95% CI bands;
    ``note`` ends every panel title (e.g. "random weights")."""
    d = s.assign(metric=s["curve_variant"].astype(str) + " · target=" + s["target"].astype(str))
    for c in [c for c in condition(s)[3:] if s[c].nunique() > 1]:  # e.g. two step settings: numbered panels
        codes = {v: i + 1 for i, v in enumerate(sorted(s[c].astype(str).unique()))}
        d["metric"] += f" · {c} #" + s[c].astype(str).map(codes).astype(str)
    panels = list(dict.fromkeys(d.sort_values(["curve_variant", "target", "metric"])["metric"]))

    def label(ax, key, panel, _d) -> None:
        inserted = panel.startswith("insertion")
        ax.set(xlabel="fraction inserted" if inserted else "fraction removed", ylabel=f"mean {key[0]}",
               title=panel + (f" · {note}" if note else ""))

    return band_grid(d, ["score"], panels, "fraction", out_dir, name, label, pal=pal)


def section(r: Report, rows: pd.DataFrame, n_boot: int, seed: int) -> None:
    """Add each curve study's figures (per setting), curve table and AUC table to report ``r``."""
    figdir, tabdir = r.out_dir / "figures", r.out_dir / "tables"
    random_models = set(random_weight_models(rows))
    for study, g in rows.groupby("study", sort=True):
        s = summary(g, n_boot, seed)
        if s["mean"].notna().sum() == 0:
            r.skipped.append(f"{study} curves: every curve is NaN (see map_flag counts)")
            continue
        settings = list(s.groupby(SETTING, sort=True))
        for setting, ss in settings:
            name = f"curves_{study}" if len(settings) == 1 else f"curves_{study}_{figures.slug(*setting)}"
            note = "random weights" if setting[SETTING.index("model")] in random_models else ""
            r.figures.append(Item(f"{study} curves ({' · '.join(map(str, setting))}{', ' + note if note else ''})",
                                  figure(ss, figdir, name, r.palette, note),
                                  "mean score against the removed/inserted fraction per method (point 0 = the "
                                  "clean image), shaded 95% bootstrap CI over samples; one panel per variant × "
                                  "target, one row per score"))
        r.tables.append(Item(f"{study} curves (points)", tables.write(s, POINTS_NOTE, tabdir,
                                                                      f"curves_{study}",
                                                                      f"{study}: mean curve points (see the CSV)"),
                             "every point of every mean curve with its 95% bootstrap band (CSV)"))
        auc = auc_summary(g, n_boot, seed)
        r.tables.append(Item(f"{study} AUC", tables.write(auc, auc_md(auc), tabdir, f"auc_{study}",
                                                          f"{study}: AUC mean [95% bootstrap CI]"),
                             f"mean AUC per method, variant and target with 95% bootstrap CIs ({n_boot} resamples); "
                             "paired tests in the wilcoxon table"))
