"""Build the whole report: frame, tables, figures, index.md (and optionally a W&B run)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import pandas as pd

from clip_xai import provenance
from clip_xai.report import bands, controls, curves, figures, overview, palette, stats, tables
from clip_xai.report import localisation as localisation_report
from clip_xai.report import matrices as matrices_report
from clip_xai.report import randomisation as randomisation_report
from clip_xai.report.collect import CURVE_STUDIES, REPORT_MARKER, collect, example_index
from clip_xai.report.collect import random_weight_models as _random_weight_models
from clip_xai.report.contents import Item, Report
from clip_xai.schema import DONE_FILE

log = logging.getLogger(__name__)


def _sensitivity(r: Report, sens: pd.DataFrame, n_boot: int, seed: int, grid_eps: float | None,
                 grid_samples: int) -> None:
    """Sensitivity summary table, ε curves, Δs plots and qualitative grids."""
    figdir, tabdir = r.out_dir / "figures", r.out_dir / "tables"
    metrics = [m for m in figures.SENS_METRICS if m in sens.columns and sens[m].notna().any()]
    if not metrics:
        r.skipped.append("sensitivity figures: every sensitivity row has NaN spearman/ssim/topk (see map_flag counts)")
        return
    summary = stats.summarise(sens, metrics, ["dataset", "model", "perturbation", "eps", "method"], n_boot, seed)
    df, md = tables.sensitivity_summary(summary)
    r.tables.append(Item("Sensitivity summary", tables.write(df, md, tabdir, "sensitivity_summary",
                                                               "Sensitivity: mean [95% bootstrap CI]"),
                         f"mean map stability per method and ε with 95% bootstrap CIs ({n_boot} resamples over samples)"))
    r.figures.append(Item("Stability vs ε", bands.sensitivity_curves(summary, figdir, pal=r.palette),
                          "mean Spearman / SSIM / Top-K vs ε per method, shaded 95% bootstrap CI; higher = more stable"))
    if "sim_diff" in sens.columns and sens["sim_diff"].notna().any():
        for m in metrics:
            r.figures.append(Item(f"{figures.SENS_METRICS[m]} vs Δs", figures.metric_vs_simdiff(sens, m, figdir, seed),
                                  f"per-sample {figures.SENS_METRICS[m]} against the relative CLIP similarity change "
                                  f"Δs, one panel per method, colour = ε"))
    else:
        r.skipped.append("metric vs Δs figures: sim_diff is NaN in every sensitivity row")
    ex = example_index(sens)
    if not ex:
        r.skipped.append("qualitative grid: no sensitivity run has an examples.npz")
        return
    settings = sorted({(e["dataset"], e["model"], e["perturbation"]) for e in ex}, key=str)
    for s in settings:
        name = "qualitative_grid" if len(settings) == 1 else f"qualitative_grid_{figures.slug(*s)}"
        res = figures.qualitative_grid([e for e in ex if (e["dataset"], e["model"], e["perturbation"]) == s],
                                       figdir, name, grid_eps, grid_samples)
        if res:
            paths, eps = res
            r.figures.append(Item(f"Qualitative grid ({' · '.join(map(str, s))})", paths,
                                  f"map overlays at ε={eps:g}: rows = samples × (clean, perturbed), columns = methods"))


def _faithfulness(r: Report, faith: pd.DataFrame) -> None:
    """ABM-layout faithfulness table and the ROAD table."""
    tabdir = r.out_dir / "tables"
    conf = [c for c in ["conf_drop_image", "conf_incr_image", "conf_drop_text", "conf_incr_text"]
            if c in faith.columns and faith[c].notna().any()]
    if conf:
        df, md = tables.faithfulness_table(faith)
        r.tables.append(Item("Faithfulness", tables.write(df, md, tabdir, "faithfulness",
                                                          "Faithfulness (mean; best in bold)"),
                             "method × dataset × {image, text} × {conf drop ↓, conf incr ↑} means (ABM paper layout)"))
    else:
        r.skipped.append("faithfulness conf drop/incr table: all conf_* values are NaN")
    if any(c in faith.columns and faith[c].notna().any() for c in tables.ROAD_COLUMNS):
        df, md = tables.road_table(faith)
        r.tables.append(Item("ROAD", tables.write(df, md, tabdir, "road", "ROAD per method (mean; higher is better)"),
                             "ROAD score (and its MoRF/LeRF parts) per method and dataset"))
    else:
        r.skipped.append("ROAD table: all road values are NaN")


def _index_md(r: Report, counts: pd.DataFrame) -> str:
    """The text of index.md."""
    c = r.collection
    rel = lambda p: p.relative_to(r.out_dir).as_posix()  # noqa: E731
    studies = c.frame.groupby("study")["run_dir"].nunique()
    lines = ["# clip_xai report", "",
             f"Gathered from: {', '.join(f'`{p}`' for p in c.roots)}", ""]
    if r.overview:
        lines += ["## Overview", "", r.overview, ""]
    lines += ["## Counts", "",
             f"- runs found: **{len(c.runs)}** complete ({', '.join(f'{n} {s}' for s, n in studies.items())}) "
             f"in {len(c.sweeps)} sweep(s)",
             f"- incomplete runs skipped (no `{DONE_FILE}`): **{len(c.incomplete)}**"]
    lines += [f"  - `{p}`" for p in c.incomplete]
    random_models = _random_weight_models(c.frame)
    if random_models:
        lines.append(f"- **random weights** (not pretrained): {', '.join(f'`{m}`' for m in random_models)}: "
                     "these runs test the pipeline; their maps say nothing about what CLIP looks at")
    lines += [f"- result rows: **{len(c.frame)}**" + (f" (plus {c.duplicates_dropped} exact duplicate rows, e.g. a copied run, "
                                                      f"dropped)" if c.duplicates_dropped else ""),
              "", "Rows per explainer; `rows_nan_metric` = rows with a NaN in a metric the explainer reports, "
              "`rows_map_flag` = rows whose map was unusable (`map_flag` non-empty, metrics NaN):", "",
              tables.markdown(counts), *provenance.report_lines(c.runs), "## Data", "",
              "- [results.parquet](results.parquet) · [results.csv](results.csv) — the tidy frame: every row of "
              "every run, with the resolved config as `cfg.*` columns plus `method`, `run_dir`, `sweep`"]
    if r.view_file is not None:
        lines.append(f"- [{r.view_file.name}]({r.view_file.name}) — the W&B workspace view of these runs (saved to W&B "
                     f"with `python -m clip_xai.report --wandb-view {r.out_dir}` after `wandb sync`)")
    lines.append("")
    lines += ["## Figures", ""]
    for it in r.figures:
        png = next(p for p in it.paths if p.suffix == ".png")
        pdf = next(p for p in it.paths if p.suffix == ".pdf")
        lines += [f"- **{it.title}** — {it.what}. [PNG]({rel(png)}) · [PDF]({rel(pdf)})", "",
                  f"  ![{it.title}]({rel(png)})", ""]
    if not r.figures:
        lines += ["(none)", ""]
    lines += ["## Tables", ""]
    for it in r.tables:
        md, csv = (next(p for p in it.paths if p.suffix == s) for s in (".md", ".csv"))
        lines.append(f"- **{it.title}** — {it.what}. [Markdown]({rel(md)}) · [CSV]({rel(csv)})")
    lines += ["", "## Skipped", ""] + ([f"- {s}" for s in r.skipped] or ["(nothing)"])
    return "\n".join(lines) + "\n"


def make_report(dirs: Iterable[str | Path], out: str | Path | None = None, n_boot: int = 1000, seed: int = 0,
                grid_eps: float | None = None, grid_samples: int = 4, use_wandb: bool = False,
                wandb_mode: str = "offline", wandb_project: str | None = None,
                wandb_entity: str | None = None) -> Report:
    """Gather the runs under `dirs` and write the report into `out` (default `<first dir>/report`);
    with ``use_wandb`` also log it as a W&B run and write (online: save) its workspace view."""
    dirs = [Path(d) for d in dirs]
    out_dir = Path(out) if out is not None else (dirs[0] / "report" if dirs else Path("report"))
    coll = collect(dirs, exclude=[out_dir])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_MARKER).write_text("clip_xai report output: never read as a run dir\n")
    df = coll.frame
    r = Report(out_dir, out_dir / "index.md", coll, palette=palette.palette(df["method"].astype(str)))
    df.to_parquet(out_dir / "results.parquet", index=False)
    df.to_csv(out_dir / "results.csv", index=False)
    log.info("gathered %d rows from %d runs (%d incomplete skipped)", len(df), len(coll.runs), len(coll.incomplete))

    sens, faith = df[df["study"] == "sensitivity"], df[df["study"] == "faithfulness"]
    if len(sens):
        _sensitivity(r, sens, n_boot, seed, grid_eps, grid_samples)
        matrices_report.section(r, sens, n_boot, seed)
        figs, tabs, skipped = controls.controls_view(sens, out_dir, n_boot, seed)
        r.figures += [Item(*f) for f in figs]
        r.tables += [Item(*t) for t in tabs]
        r.skipped += skipped
    else:
        r.skipped.append("sensitivity figures and tables: no sensitivity rows")
    if len(faith):
        _faithfulness(r, faith)
    else:
        r.skipped.append("faithfulness tables: no faithfulness rows")

    for study, section in (("localisation", localisation_report.section), ("randomisation", randomisation_report.section)):
        rows = df[df["study"] == study]
        if len(rows):
            section(r, rows, n_boot, seed)
        else:
            r.skipped.append(f"{study} table and figure: no {study} rows")

    rows = df[df["study"].isin(CURVE_STUDIES)]
    if len(rows):
        curves.section(r, rows, n_boot, seed)
    else:
        r.skipped.append("faithfulness curves (perturbation_curve, deletion_insertion): no curve rows")
    overview.section(r, df, n_boot, seed)  # last computed, first shown (index.md and the item lists)

    tabdir = out_dir / "tables"
    abl = tables.ablation(df)
    if abl is not None:
        r.tables.append(Item("ABM ablation (layer × T)", tables.write(*abl, tabdir, "ablation_abm",
                                                                      "ABM ablation: target layer × steps T (mean)"),
                             "abm mean per metric with cfg.explainer.target_layer as rows, cfg.explainer.steps as columns"))
    else:
        r.skipped.append("ablation layer × T: no abm runs sweeping cfg.explainer.target_layer / cfg.explainer.steps")
    tests, ranks = stats.paired_tests(df), stats.rank_table(df)  # families keep every study's conditions apart
    if len(tests):
        r.tables.append(Item("Paired tests", tables.write(tests, tables.wilcoxon_md(tests), tabdir, "wilcoxon",
                                                          "Paired method comparisons (Wilcoxon + Holm)"),
                             "Wilcoxon signed-rank p-values per method pair on shared samples, Holm-corrected "
                             "within metric × study × setting × condition, with the better method"))
        r.tables.append(Item("Ranking", tables.write(ranks, tables.ranks_md(ranks), tabdir, "ranks",
                                                     "Mean rank of methods per metric and ε"),
                             "mean rank of each method across shared samples per metric, setting and condition (1 = best)"))
    else:
        r.skipped.append("paired tests and ranking: no metric has two methods on shared samples")
    counts = tables.counts(df)
    r.tables.append(Item("Counts", tables.write(counts, tables.markdown(counts), tabdir, "counts",
                                                "Rows, NaN metrics and map flags per explainer"),
                         "rows, rows with NaN metrics and rows with a map_flag per study × explainer"))
    view = None
    if use_wandb:  # the view's definition needs no server: written before the index that links it
        from clip_xai.report import wandb_view

        groups = wandb_view.groups(r)
        view = wandb_view.build(r, project=wandb_project or "clip_xai", entity=wandb_entity)
        r.view_file = wandb_view.write_definition(out_dir, view, groups)
    r.index.write_text(_index_md(r, counts))
    log.info("report written to %s", r.index)
    if use_wandb:
        from clip_xai.report.wandb_log import log_report

        summary = {"runs": len(coll.runs), "incomplete_runs": len(coll.incomplete), "rows": len(df),
                   **overview.summary_keys(r.out_dir / "tables" / "overview.csv")}
        log_report(out_dir, [p for it in r.figures for p in it.paths], [p for it in r.tables for p in it.paths],
                   summary, mode=wandb_mode, project=wandb_project, entity=wandb_entity,
                   group=wandb_view.report_group(groups, out_dir),
                   config={"dirs": [str(d) for d in dirs], "n_boot": n_boot, "seed": seed})
        if wandb_mode == "online":
            try:
                log.info("W&B view saved: %s", wandb_view.save_view(r.view_file, entity=wandb_entity).url)
            except Exception as e:  # noqa: BLE001 - the definition stays on disk to save later
                log.warning("W&B view not saved (%s); save it later with python -m clip_xai.report --wandb-view %s",
                            e, out_dir)
    return r
