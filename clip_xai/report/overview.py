"""The report's first section: one row per method (per dataset and model) with each study's headline
number, its 95% bootstrap CI, the direction of better and the method's rank in it, and the mean
rank; plus a figure of the methods against the study categories.

One headline metric per study category (the choice is documented in docs/reports.md):

==================  ==========================================================================
category            headline
==================  ==========================================================================
sensitivity         spearman at the sweep's middle ε, per attack (random controls left out)
faithfulness        conf_drop_image ↓
localisation        miou ↑ when the rows carry it, else pointing_game ↑ (clean maps, per mask)
randomisation       rand_spearman ↓, per sample averaged over the randomised states (cascading)
complexity          sparseness ↑ of the clean map (first study that has it)
manipulation        mask_flag ↓ of the clean map (metrics=manipulation)
perturbation_curve  auc_hit, one column per variant × target (positive ↓, negative ↑)
deletion_insertion  auc_top1, one column per variant × target (deletion ↓, insertion ↑)
==================  ==========================================================================

Ranking: within a column, methods are ranked by their mean over the samples all of them share
(1 = best, ties share the average rank); the number shown is that mean with its 95% bootstrap CI.
A column with one method shows rank 1 of 1 and does not enter the mean rank; methods on disjoint
samples are not ranked. Columns whose ranked samples differ (studies run on different samples)
are never averaged together: each set of columns on the same samples gets its own mean rank, and
the page says which.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import seaborn as sns

from clip_xai.report import controls, figures, palette, stats, tables
from clip_xai.report.collect import random_weight_models
from clip_xai.report.contents import Item, Report
from clip_xai.report.curves import HEADLINE_SCORE
from clip_xai.report.curves import condition as curve_condition
from clip_xai.report.localisation import SEG_METRICS, clean_rows
from clip_xai.schema import HIGHER_IS_BETTER

SETTING = ["dataset", "model"]
CATEGORIES = ["sensitivity", "faithfulness", "localisation", "randomisation", "complexity", "manipulation",
              "perturbation_curve", "deletion_insertion"]
COLUMNS = ["dataset", "model", "weights", "column", "category", "study", "metric", "higher_is_better", "method",
           "n", "mean", "lo", "hi", "rank", "n_ranked", "sample_set"]


@dataclass
class Column:
    """One headline column: its label, category, metric, direction, per-sample values (``method``,
    ``sample_id``, ``value``; repeats and pooled states already averaged, NaN dropped) and the
    samples its rows ran on (NaN rows included: what decides whether two columns share samples)."""

    label: str
    category: str
    study: str
    metric: str
    higher: bool
    rows: pd.DataFrame

    @property
    def values(self) -> pd.DataFrame:
        return _per_sample(self.rows, self.metric)

    @property
    def ran_on(self) -> frozenset:
        return frozenset(self.rows["sample_id"].astype(str))


def _per_sample(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean of ``metric`` per method × sample (NaN rows dropped)."""
    v = rows[["method", "sample_id", metric]].dropna(subset=[metric]).astype({"sample_id": str})
    return v.groupby(["method", "sample_id"], sort=True)[metric].mean().rename("value").reset_index()


def _has(rows: pd.DataFrame, metric: str) -> bool:
    return metric in rows.columns and rows[metric].notna().any()


def _sensitivity(df: pd.DataFrame) -> list[Column]:
    """spearman at the middle ε of each attack (the larger middle value of an even count)."""
    sens = df[df["study"] == "sensitivity"]
    sens = sens[~controls.is_control(sens)]
    out = []
    if not _has(sens, "spearman"):
        return out
    for pert, g in sens.groupby("perturbation", sort=True):
        eps = sorted(g["eps"].dropna().unique())
        if not eps:
            continue
        mid = eps[len(eps) // 2]
        out.append(Column(f"sensitivity · {pert} ε={mid:g} · spearman", "sensitivity", "sensitivity", "spearman",
                          True, g[np.isclose(g["eps"], mid)]))
    return out


def _faithfulness(df: pd.DataFrame) -> list[Column]:
    rows = df[df["study"] == "faithfulness"]
    if not _has(rows, "conf_drop_image"):
        return []
    return [Column("faithfulness · conf_drop_image", "faithfulness", "faithfulness", "conf_drop_image",
                   HIGHER_IS_BETTER["conf_drop_image"], rows)]


def _localisation(df: pd.DataFrame) -> list[Column]:
    rows = df[df["study"] == "localisation"]
    if not len(rows):
        return []
    rows = clean_rows(rows)
    metric = "miou" if _has(rows, "miou") else "pointing_game"
    if not _has(rows, metric):
        return []
    masks = sorted(rows["mask"].dropna().astype(str).unique()) if "mask" in rows.columns else []
    groups = [(m, rows[rows["mask"].astype(str) == m]) for m in masks] if len(masks) > 1 else [("", rows)]
    return [Column(f"localisation{f' · {m}' if m else ''} · {metric}", "localisation", "localisation", metric,
                   HIGHER_IS_BETTER.get(metric, SEG_METRICS.get(metric, True)), g)
            for m, g in groups]


def _randomisation(df: pd.DataFrame) -> list[Column]:
    rows = df[df["study"] == "randomisation"]
    rows = rows[rows["randomisation"] != "none"] if len(rows) else rows
    if not _has(rows, "rand_spearman"):
        return []
    if (rows["randomisation"] == "cascading").any():
        rows = rows[rows["randomisation"] == "cascading"]
    towers = sorted(rows["tower"].dropna().astype(str).unique())
    groups = [(t, rows[rows["tower"].astype(str) == t]) for t in towers] if len(towers) > 1 else [("", rows)]
    mode = str(rows["randomisation"].iloc[0]) if rows["randomisation"].nunique() == 1 else "all modes"
    return [Column(f"randomisation ({mode}{f', {t}' if t else ''}) · rand_spearman", "randomisation",
                   "randomisation", "rand_spearman", HIGHER_IS_BETTER["rand_spearman"], g)
            for t, g in groups]


def _complexity(df: pd.DataFrame) -> list[Column]:
    for study, metric in [("sensitivity", "sparseness"), ("localisation", "sparseness"),
                          ("faithfulness", "sparseness_image"), ("randomisation", "sparseness")]:
        rows = df[df["study"] == study]
        if _has(rows, metric):
            return [Column(f"complexity · {metric} ({study})", "complexity", study, metric,
                           HIGHER_IS_BETTER.get(metric, True), rows)]
    return []


def _manipulation(df: pd.DataFrame) -> list[Column]:
    rows = df[df["study"] == "sensitivity"]
    if not _has(rows, "mask_flag"):
        return []
    return [Column("manipulation · mask_flag", "manipulation", "sensitivity", "mask_flag",
                   HIGHER_IS_BETTER["mask_flag"], rows)]


def _curve(study: str) -> Callable[[pd.DataFrame], list[Column]]:
    def columns(df: pd.DataFrame) -> list[Column]:
        metric = f"auc_{HEADLINE_SCORE[study]}"
        rows = df[df["study"] == study]
        out = []
        if not _has(rows, metric):
            return out
        extra = [c for c in curve_condition(rows)[3:] if rows[c].astype(str).nunique() > 1]
        for key, g in rows.groupby(["curve_variant", "target", *extra], sort=True):
            variant, target, *other = key
            hib = stats.higher_is_better(metric, {"curve_variant": variant})
            if hib is None:
                continue
            more = "".join(f" · {c}={v}" for c, v in zip(extra, other))
            out.append(Column(f"{study} · {variant} · {target}{more} · {metric}", study, study, metric, hib, g))
        return out
    return columns


HEADLINES: dict[str, Callable[[pd.DataFrame], list[Column]]] = {
    "sensitivity": _sensitivity, "faithfulness": _faithfulness, "localisation": _localisation,
    "randomisation": _randomisation, "complexity": _complexity, "manipulation": _manipulation,
    "perturbation_curve": _curve("perturbation_curve"), "deletion_insertion": _curve("deletion_insertion"),
}


def rank_column(col: Column, n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, bool, str]:
    """Per method: n, mean, CI and rank of one column; whether it was ranked (two methods or more
    on shared samples); a note ("" if none). Methods are compared on the samples with a value for
    all of them; ties share the average rank."""
    by_method = {m: g.set_index("sample_id")["value"] for m, g in col.values.groupby("method", sort=True)}
    sets = {m: frozenset(v.index) for m, v in by_method.items()}
    shared = frozenset.intersection(*sets.values()) if sets else frozenset()
    note, ranked = "", len(by_method) > 1 and len(shared) > 0
    if len(by_method) > 1 and not shared:
        note = "the methods ran on disjoint samples: not ranked"
    elif ranked and any(s != shared for s in sets.values()):
        note = f"methods compared on the {len(shared)} samples all of them share"
    rows = []
    for m, v in by_method.items():
        x = v[sorted(shared)] if ranked else v
        mean, lo, hi = stats.bootstrap_ci(x.to_numpy(float), n_boot=n_boot, seed=seed)
        rows.append({"method": m, "n": len(x), "mean": mean, "lo": lo, "hi": hi})
    out = pd.DataFrame(rows, columns=["method", "n", "mean", "lo", "hi"])
    if len(by_method) == 1:
        out["rank"], note = 1.0, "one method only: not in the mean rank"
    elif ranked:
        out["rank"] = out["mean"].rank(ascending=not col.higher, method="average")
    else:
        out["rank"] = np.nan
    return out, ranked, note


def setting_table(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """The long overview table of one setting's rows (COLUMNS, plus mean-rank rows with
    ``category == "mean rank"``) and the notes on columns (one-method, disjoint, different samples)."""
    cols = [c for cat in CATEGORIES for c in HEADLINES[cat](df)]
    parts, notes, sets = [], [], {}
    for c in cols:
        t, ranked, note = rank_column(c, n_boot, seed)
        if note:
            notes.append(f"{c.label}: {note}")
        if ranked:
            sets[c.label] = c.ran_on
        parts.append(t.assign(column=c.label, category=c.category, study=c.study, metric=c.metric,
                              higher_is_better=c.higher, n_ranked=len(t) if t["rank"].notna().any() else 0,
                              sample_set=""))
    long = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    groups: dict[frozenset, list[str]] = {}
    for label, s in sets.items():
        groups.setdefault(s, []).append(label)
    names = {s: chr(ord("A") + i) for i, s in enumerate(groups)}
    mean_rows = []
    for s, labels in groups.items():
        methods = {frozenset(long.loc[long["column"] == lab, "method"]) for lab in labels}
        if len(methods) > 1:
            notes.append(f"the columns {', '.join(labels)} rank different sets of methods: a mean rank compares "
                         "methods fairly only where they appear in the same columns (see its column count)")
        long.loc[long["column"].isin(labels), "sample_set"] = names[s] if len(groups) > 1 else "all"
        r = long[long["column"].isin(labels)].groupby("method")["rank"].agg(["mean", "count"])
        for method, v in r.iterrows():
            mean_rows.append({"column": "mean rank" + (f" (samples {names[s]})" if len(groups) > 1 else ""),
                              "category": "mean rank", "study": "", "metric": "rank", "higher_is_better": False,
                              "method": method, "n": int(v["count"]), "mean": v["mean"], "lo": np.nan,
                              "hi": np.nan, "rank": np.nan, "n_ranked": len(labels),
                              "sample_set": names[s] if len(groups) > 1 else "all"})
    if len(groups) > 1:
        desc = "; ".join(f"**{names[s]}** ({len(s)} samples): {', '.join(labels)}" for s, labels in groups.items())
        notes.insert(0, f"the studies ran on different samples, so their ranks are not averaged together: "
                        f"one mean rank per sample set: {desc}")
    long = pd.concat([long, pd.DataFrame(mean_rows)], ignore_index=True) if mean_rows else long
    return long, notes


def overview_table(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, dict[tuple, list[str]]]:
    """The long overview table of every setting (dataset × model) and each setting's notes."""
    random_models = set(random_weight_models(df))
    parts, notes = [], {}
    for key, g in df.groupby(SETTING, sort=True):
        t, n = setting_table(g, n_boot, seed)
        if len(t):
            parts.append(t.assign(dataset=key[0], model=key[1],
                                  weights="random" if str(key[1]) in random_models else "pretrained"))
            notes[key] = n
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    return out[COLUMNS], notes


def _order(t: pd.DataFrame) -> list[str]:
    """Methods by their first mean rank, then by name (unranked last)."""
    mr = t[t["category"] == "mean rank"]
    first = mr[mr["column"] == mr["column"].iloc[0]].set_index("method")["mean"] if len(mr) else pd.Series(dtype=float)
    methods = sorted(set(t["method"]))
    return sorted(methods, key=lambda m: (first.get(m, np.inf), palette.ordered(methods).index(m)))


def _cell(r: pd.Series) -> str:
    if r["category"] == "mean rank":
        return f"{tables.fmt(r['mean'])} ({int(r['n'])} col{'s' if r['n'] != 1 else ''})"
    rank = "" if pd.isna(r["rank"]) else f" #{r['rank']:g}/{int(r['n_ranked'])}"
    return f"{tables.fmt(r['mean'])} [{tables.fmt(r['lo'])}, {tables.fmt(r['hi'])}]{rank}"


def setting_md(t: pd.DataFrame) -> str:
    """One setting's overview as Markdown: rows = methods (best mean rank first), columns = headlines."""
    t = t.assign(cell=t.apply(_cell, axis=1))
    heads = {}
    for label, g in t.groupby("column", sort=False):
        hib = g["higher_is_better"].iloc[0]
        heads[label] = label if g["category"].iloc[0] == "mean rank" else f"{label} {tables.ARROW[bool(hib)]}"
    wide = t.pivot_table(index="method", columns="column", values="cell", aggfunc="first", sort=False)
    wide = wide.reindex(index=_order(t), columns=list(heads)).fillna("–")
    wide.columns = [heads[c] for c in wide.columns]
    wide.index.name = "method"
    return tables.markdown(wide, index=True)


def figure(t: pd.DataFrame, out_dir: Path, name: str, title: str) -> list[Path]:
    """Heatmap: rows = methods (best mean rank first), columns = headline columns (+ mean ranks);
    colour = rank scaled to 0 (best) .. 1 (worst) within its column, text = rank."""
    methods = _order(t)
    labels = list(dict.fromkeys(t["column"]))
    scaled = pd.DataFrame(np.nan, index=methods, columns=labels)
    text = pd.DataFrame("", index=methods, columns=labels)
    for _, r in t.iterrows():
        if r["category"] == "mean rank":
            k = max(1, int(t[(t["column"] != r["column"]) & (t["sample_set"] == r["sample_set"])]["n_ranked"].max()))
            scaled.loc[r["method"], r["column"]] = (r["mean"] - 1) / max(1, k - 1)
            text.loc[r["method"], r["column"]] = f"{r['mean']:.1f}"
        elif not pd.isna(r["rank"]):
            scaled.loc[r["method"], r["column"]] = (r["rank"] - 1) / max(1, r["n_ranked"] - 1)
            text.loc[r["method"], r["column"]] = f"{r['rank']:g}"
        else:
            text.loc[r["method"], r["column"]] = "·"
    fig, axes = figures._figure(1, 1, max(4.0, 0.75 * len(labels) + 2.5), max(3.6, 0.32 * len(methods) + 2.0))
    ax = axes[0, 0]
    sns.heatmap(scaled.astype(float), ax=ax, cmap="viridis_r", vmin=0, vmax=1, annot=text.to_numpy(), fmt="",
                annot_kws={"fontsize": 7}, linewidths=0.5, linecolor="white",
                cbar_kws={"label": "scaled rank (0 best, 1 worst)", "shrink": 0.8})
    hib = t.drop_duplicates("column").set_index("column")
    ticks = [lab.replace(" · ", "\n", 1) + ("" if hib.loc[lab, "category"] == "mean rank"
                                             else f" {tables.ARROW[bool(hib.loc[lab, 'higher_is_better'])]}")
             for lab in labels]
    ax.set_xticks(np.arange(len(labels)) + 0.5, ticks, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(len(methods)) + 0.5, methods, rotation=0, fontsize=7)
    ax.set(xlabel="", ylabel="")
    ax.set_title(title, fontsize=9)
    return figures.save(fig, out_dir, name)


def section(r: Report, df: pd.DataFrame, n_boot: int, seed: int) -> None:
    """Write the overview table and figure(s), put them first in the report and set ``r.overview``
    (only when the rows hold two studies or more: with one, the overview would repeat its section)."""
    studies = sorted(df["study"].unique())
    if len(studies) < 2:
        r.skipped.append(f"overview: one study only ({', '.join(studies)}); it compares methods across studies")
        return
    t, notes = overview_table(df, n_boot, seed)
    if t.empty:
        r.skipped.append("overview: no study has a headline metric with a value")
        return
    tabdir, figdir = r.out_dir / "tables", r.out_dir / "figures"
    lines, plain, figs = [], [], []
    keys = list(t.groupby(SETTING, sort=True).groups)
    for key in keys:
        g = t[(t["dataset"] == key[0]) & (t["model"] == key[1])]
        random = g["weights"].iloc[0] == "random"
        weights = " — **random weights** (not pretrained: these numbers test the pipeline, not CLIP)" if random else ""
        title = f"Overview · {key[0]} · {key[1]}" + (" (random weights)" if random else "")
        name = "overview" if len(keys) == 1 else f"overview_{figures.slug(*key)}"
        paths = figure(g, figdir, name, title)
        figs.append(Item(title, paths, "methods against the study categories: rank within each headline column "
                                       "(1 = best) and the mean rank(s)"))
        png = paths[0].relative_to(r.out_dir).as_posix()
        body = [f"### {key[0]} · {key[1]}{weights}", "", setting_md(g), *[f"- {n}" for n in notes.get(key, [])], ""]
        plain += body
        lines += [*body, f"![{title}]({png})", ""]
    head = ("Each cell: the headline number's mean [95% bootstrap CI] over the samples the methods share, "
          "then #rank/methods ranked (1 = best, ties share the average rank); ↑/↓ = higher/lower is better. "
          "Mean rank = the mean of a method's ranks over the columns ranked on the same samples (columns "
          "with one method left out). Headline choices: docs/reports.md.\n\n")
    r.overview = head + "\n".join(lines)
    r.tables.insert(0, Item("Overview", tables.write(t, head + "\n".join(plain), tabdir, "overview", "Overview: every method across the studies"),
                            "each study's headline number per method with its 95% CI, the direction of better, "
                            "the rank and the mean rank"))
    r.figures[0:0] = figs


def summary_keys(path: Path) -> dict[str, float]:
    """W&B summary keys of a written overview table: ``overview/<dataset>/<model>/<mean rank
    column>/<method>`` -> mean rank (empty when there is no overview)."""
    if not Path(path).is_file():
        return {}
    t = pd.read_csv(path)
    t = t[(t["category"] == "mean rank") & t["mean"].notna()]
    return {f"overview/{r.dataset}/{r.model}/{r.column}/{r.method}": float(r.mean) for r in t.itertuples()}
