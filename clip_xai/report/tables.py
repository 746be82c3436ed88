"""Report tables (pandas frames) and their Markdown + CSV files."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clip_xai.report.stats import CURVE_METRICS, FAMILY
from clip_xai.schema import HIGHER_IS_BETTER

FAITH_MEASURES = [("conf_drop", "drop ↓"), ("conf_incr", "incr ↑")]
ROAD_COLUMNS = ["road", "road_morf", "road_lerf"]
ARROW = {True: "↑", False: "↓"}


def fmt(v: Any, digits: int = 3) -> str:
    """One table cell as text (NaN -> '–')."""
    if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return str(v)


def markdown(df: pd.DataFrame, index: bool = False, bold: dict[str, bool] | None = None,
             row_best: bool | None = None) -> str:
    """GitHub Markdown table; bold each `bold` column's best (col -> higher is better), or each row's if row_best."""
    d = df.reset_index() if index else df
    best: dict[str, Any] = {}
    for c, hib in (bold or {}).items():
        if c in d.columns and pd.api.types.is_numeric_dtype(d[c]) and d[c].notna().any():
            best[c] = d[c].max() if hib else d[c].min()
    value_cols = list(df.columns)
    lines = ["| " + " | ".join(str(c) for c in d.columns) + " |", "|" + "|".join("---" for _ in d.columns) + "|"]
    for _, row in d.astype(object).iterrows():
        vals = pd.to_numeric(row[value_cols], errors="coerce")
        rbest = None if row_best is None or vals.isna().all() else (vals.max() if row_best else vals.min())
        cells = []
        for c in d.columns:
            s = fmt(row[c]).replace("|", "\\|")
            hit = (c in best and row[c] == best[c]) or (rbest is not None and c in value_cols and row[c] == rbest)
            cells.append(f"**{s}**" if hit else s)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ci_cells(means, los, his) -> list[str]:
    """``mean [lo, hi]`` cells (each value through :func:`fmt`), the one format of every CI table."""
    return [f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]" for m, lo, hi in zip(means, los, his)]


def fmt_eps(v: Any) -> str:
    """ε as short text ('–' for none)."""
    return "–" if v is None or pd.isna(v) else f"{float(v):g}"


def write(df: pd.DataFrame, md: str, out_dir: Path, name: str, title: str) -> list[Path]:
    """Write `<name>.csv` (the frame) and `<name>.md` (title + markdown body); return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, mdp = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    df.to_csv(csv, index=False)
    mdp.write_text(f"# {title}\n\n{md}")
    return [mdp, csv]


def _setting(df: pd.DataFrame) -> pd.Series:
    """'dataset · model · perturbation' text per row."""
    cols = [c for c in ["dataset", "model", "perturbation"] if c in df.columns]
    return df[cols].astype(str).agg(" · ".join, axis=1)


def sensitivity_summary(summary: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Mean [95% CI] per setting × ε × method (rows) and metric (columns)."""
    s = summary.copy()
    s["cell"] = ci_cells(s["mean"], s["lo"], s["hi"])
    idx = [c for c in ["dataset", "model", "perturbation", "eps", "method"] if c in s.columns]
    s = s.sort_values(idx, kind="stable")
    if "eps" in s.columns:
        s["eps"] = s["eps"].map(fmt_eps)
    wide = s.pivot_table(index=idx, columns="metric", values="cell", aggfunc="first", sort=False)
    wide = wide[[m for m in dict.fromkeys(s["metric"]) if m in wide.columns]]
    wide.columns = [f"{m} {ARROW[HIGHER_IS_BETTER.get(m, True)]}" for m in wide.columns]
    return summary, markdown(wide, index=True)


def faithfulness_table(faith: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """ABM-paper layout: method rows × (dataset, image/text, conf drop ↓ / conf incr ↑) mean columns."""
    cols: dict[str, pd.Series] = {}
    bold: dict[str, bool] = {}
    rows = _row_label(faith)
    for dataset, g in faith.groupby("dataset", sort=True):
        for mod in ["image", "text"]:
            for measure, label in FAITH_MEASURES:
                col = f"{measure}_{mod}"
                if col not in g.columns or g[col].isna().all():
                    continue
                name = f"{dataset} · {mod} · {label}"
                cols[name] = g.groupby(rows[g.index])[col].mean()
                bold[name] = HIGHER_IS_BETTER[col]
    table = pd.DataFrame(cols)
    table.index.name = "method"
    return table.reset_index(), markdown(table, index=True, bold=bold)


def road_table(faith: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """ROAD (and its MoRF/LeRF parts) mean per method (rows) and dataset (columns)."""
    cols: dict[str, pd.Series] = {}
    rows = _row_label(faith)
    for dataset, g in faith.groupby("dataset", sort=True):
        for c in ROAD_COLUMNS:
            if c in g.columns and g[c].notna().any():
                cols[f"{dataset} · {c}"] = g.groupby(rows[g.index])[c].mean()
    table = pd.DataFrame(cols)
    table.index.name = "method"
    bold = {c: True for c in table.columns if c.endswith("· road")}
    return table.reset_index(), markdown(table, index=True, bold=bold)


def _row_label(df: pd.DataFrame) -> pd.Series:
    """Method, prefixed by the model when several models are present."""
    if df["model"].nunique() > 1:
        return df["model"].astype(str) + " | " + df["method"].astype(str)
    return df["method"].astype(str)


def ablation(df: pd.DataFrame, explainer: str = "abm", row: str = "cfg.explainer.target_layer",
             col: str = "cfg.explainer.steps") -> tuple[pd.DataFrame, str] | None:
    """Per study/setting/ε/metric: `explainer` mean with `row` as rows and `col` as columns (None if no sweep)."""
    if row not in df.columns or col not in df.columns:
        return None
    sub = df[df["explainer"].astype(str).str.lower() == explainer.lower()]
    sub = sub[sub[row].notna() & sub[col].notna()].copy()
    for c in (row, col):
        if pd.api.types.is_float_dtype(sub[c]) and (sub[c] % 1 == 0).all():
            sub[c] = sub[c].astype(int)
    groups = [c for c in ["study", "dataset", "model", "perturbation", "eps"] if c in sub.columns]
    longs, parts = [], []
    for key, g in sub.groupby(groups, dropna=False, sort=True):
        if g[row].nunique() < 2 and g[col].nunique() < 2:
            continue
        key = dict(zip(groups, key))
        for m in [m for m in HIGHER_IS_BETTER if m in g.columns and g[m].notna().any()]:
            long = g.groupby([row, col], sort=True)[m].agg(["mean", "count"]).reset_index()
            longs.append(long.assign(**key, metric=m).rename(columns={row: "target_layer", col: "steps"}))
            wide = long.pivot(index=row, columns=col, values="mean")
            wide.index.name = f"{row.split('.')[-1]} \\ {col.split('.')[-1]}"
            wide.columns = [str(c) for c in wide.columns]
            where = " · ".join(fmt(v) if k != "eps" else f"ε={fmt_eps(v)}" for k, v in key.items()
                               if not (isinstance(v, float) and np.isnan(v)))
            parts.append(f"## {where} · {m} {ARROW[HIGHER_IS_BETTER[m]]}\n\n{markdown(wide, index=True)}")
    if not longs:
        return None
    long = pd.concat(longs, ignore_index=True)
    return long[[*groups, "metric", "target_layer", "steps", "mean", "count"]], "\n".join(parts)


def _family_columns(t: pd.DataFrame) -> list[str]:
    """The family columns (stats.FAMILY) a test or rank table carries with at least one value."""
    return [c for c in FAMILY if c in t.columns and t[c].notna().any()]


def _family_title(cols: list[str], key: tuple) -> str:
    """``study · dataset · model · ε=0.1 · mask=...`` for one family (NaN parts left out)."""
    parts = []
    for c, v in zip(cols, key):
        if v is None or (isinstance(v, float) and np.isnan(v)) or v == "":
            continue
        parts.append(f"ε={fmt_eps(v)}" if c == "eps" else str(v) if c in ("study", "dataset", "model") else f"{c}={v}")
    return " · ".join(parts)


def wilcoxon_md(tests: pd.DataFrame) -> str:
    """Markdown for the paired-test table (one section per family: metric × study × setting × condition)."""
    parts = []
    fam = _family_columns(tests)
    for key, g in tests.groupby([*fam, "metric"], dropna=False, sort=True):
        *key, metric = key
        hib = bool(g["higher_is_better"].iloc[0])
        t = g[["method_a", "method_b", "n", "mean_a", "mean_b", "p", "p_holm", "better", "significant"]].copy()
        t["significant"] = t["significant"].map({True: "yes", False: "no"})
        parts.append(f"## {_family_title(fam, tuple(key))} · {metric} {ARROW[hib]}\n\n{markdown(t)}")
    return "Wilcoxon signed-rank on samples shared by both methods; p_holm is Holm-corrected within each " \
           "section (one metric under one study, dataset, model, map modality and condition); better = method " \
           "with the better mean (honouring the metric's direction).\n\n" + "\n".join(parts)


def ranks_md(ranks: pd.DataFrame) -> str:
    """Markdown for the ranking table: per study, rows = metric × setting × condition, columns = methods."""
    r = ranks.copy()
    fam = [c for c in _family_columns(r) if c != "study"]
    for c in fam:
        r[c] = r[c].map(fmt_eps) if c == "eps" else r[c].astype(object).where(r[c].notna(), "–")
    r["metric"] = [f"{m} {ARROW[bool(h)]}" for m, h in zip(r["metric"], r["higher_is_better"])]
    parts = []
    for study, g in r.groupby("study", sort=True):
        rows = [c for c in fam if g[c].ne("–").any()]
        wide = g.pivot_table(index=["metric", *rows, "n_samples"], columns="method",
                             values="mean_rank", aggfunc="first", sort=False)
        wide.columns.name = None
        parts.append(f"## {study}\n\n{markdown(wide, index=True, row_best=False)}")
    return "Mean rank of each method across the samples all of them share (1 = best, ties averaged; best in " \
           "bold).\n\n" + "\n".join(parts)


def counts(df: pd.DataFrame) -> pd.DataFrame:
    """Per study × explainer: rows, rows with a NaN in a metric it reports, rows with map_flag set."""
    out = []
    for (study, expl), g in df.groupby(["study", "explainer"], sort=True):
        metrics = [m for m in [*HIGHER_IS_BETTER, *CURVE_METRICS, "road_morf", "road_lerf"] if m in g.columns and g[m].notna().any()]
        flag = g["map_flag"].fillna("").astype(str) if "map_flag" in g.columns else pd.Series("", index=g.index)
        flags = flag[flag != ""].value_counts()
        out.append({"study": study, "explainer": expl, "runs": g["run_dir"].nunique(), "rows": len(g),
                    "rows_nan_metric": int(g[metrics].isna().any(axis=1).sum()) if metrics else len(g),
                    "rows_map_flag": int((flag != "").sum()),
                    "flags": ", ".join(f"{k}: {v}" for k, v in flags.items())})
    return pd.DataFrame(out, columns=["study", "explainer", "runs", "rows", "rows_nan_metric", "rows_map_flag", "flags"])
