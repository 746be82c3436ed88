"""A ready W&B dashboard for a report: a saved workspace view (W&B's ``wandb-workspaces`` library)
over the sweep's runs and the report run.

``--wandb`` builds the view from what the report wrote (the figure and table keys the report run
logs) and writes its definition beside the report, ``wandb_view.json``: the library's own view
model, plus the project, entity and groups. The definition is saved to W&B right away in online
mode; offline (the default), ``python -m clip_xai.report --wandb-view <report dir>`` saves it
later, after ``wandb sync``. Nothing here contacts a server except :func:`save_view`.

Sections: the overview (figure, table and its notes), the sensitivity ε curves (the report's
figures and, per metric, the study runs' ``mean/<metric>`` against ``perturbation.eps``), the
faithfulness tables and curves (confidence drop/increase, ROAD, the curve studies' AUCs and
figures), the ABM layer × T grid when the report has one, and the paired tests and ranks.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clip_xai.errors import ClipXaiError
from clip_xai.report.collect import sweep_of
from clip_xai.report.contents import Report
from clip_xai.sinks.results import atomic_write

VIEW_FILE = "wandb_view.json"
FORMAT = "clip_xai.wandb_view/1"
SENS_METRICS = ["spearman", "ssim", "topk"]
FAITH_METRICS = ["conf_drop_image", "conf_incr_image", "road"]
WIDTH = 24  # W&B's panel grid is 24 units wide


def groups(r: Report) -> list[str]:
    """The W&B groups of the report's runs: a sweep's dir name, or a single run's parent dir name
    (what ``python -m clip_xai`` passes as ``group``)."""
    out = []
    for run in r.collection.runs:
        sweep = sweep_of(run)
        out.append(sweep.name if sweep is not None else run.parent.name)
    return sorted(set(out))


def report_group(gs: list[str], out_dir: Path) -> str:
    """The group the report run is logged in: the sweep's group when there is one, else one named after the report."""
    return gs[0] if len(gs) == 1 else f"report-{out_dir.resolve().name}"


def _keys(paths: list[Path], suffix: str, folder: str) -> list[str]:
    """W&B keys (``figures/<stem>``, ``tables/<stem>``) of the report files with ``suffix``."""
    return [f"{folder}/{p.stem}" for p in paths if p.suffix == suffix]


def _place(panels: list, per_row: int = 2, h: int = 8) -> list:
    """Lay panels out on the 24-wide grid, ``per_row`` side by side."""
    import wandb_workspaces.reports.v2 as wr

    w = WIDTH // per_row
    for i, p in enumerate(panels):
        p.layout = wr.Layout(x=(i % per_row) * w, y=(i // per_row) * h, w=w, h=h)
    return panels


def build(r: Report, project: str, entity: str | None = None, name: str | None = None):
    """The workspace view (a ``wandb_workspaces.workspaces.Workspace``) of report ``r``."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    figs = {it.title: _keys(it.paths, ".png", "figures") for it in r.figures}
    tabs = {it.title: _keys(it.paths, ".csv", "tables") for it in r.tables}
    fig_keys = [k for ks in figs.values() for k in ks]
    tab_keys = [k for ks in tabs.values() for k in ks]
    media = lambda keys, title: wr.MediaBrowser(title=title, media_keys=keys, num_columns=1)  # noqa: E731
    table = lambda key: wr.WeavePanelSummaryTable(table_name=key)  # noqa: E731
    sections = []

    over = [k for k in fig_keys if k.split("/")[1].startswith("overview")]
    if over or "tables/overview" in tab_keys:
        panels = [media(over, "Overview: methods × study categories (rank)")] if over else []
        panels += [table("tables/overview")] if "tables/overview" in tab_keys else []
        if r.overview:
            panels.append(wr.MarkdownPanel(markdown=r.overview))
        sections.append(ws.Section(name="Overview", panels=_place(panels, per_row=1, h=12), is_open=True))

    sens = [k for k in fig_keys if k.split("/")[1].startswith(("sensitivity_vs_eps", "controls_vs_eps"))]
    if sens or "tables/sensitivity_summary" in tab_keys:
        panels = [media(sens, "ε curves per method (report)")] if sens else []
        panels += [wr.ScatterPlot(title=f"mean {m} vs ε (one point per run)", x=wr.Config("perturbation.eps"),
                                  y=wr.SummaryMetric(f"mean/{m}")) for m in SENS_METRICS]
        panels += [table("tables/sensitivity_summary")] if "tables/sensitivity_summary" in tab_keys else []
        sections.append(ws.Section(name="Sensitivity: ε curves per method", panels=_place(panels), is_open=True))

    faith_tabs = [k for k in tab_keys if k.split("/")[1] in ("faithfulness", "road") or k.startswith("tables/auc_")]
    curve_figs = [k for k in fig_keys if k.split("/")[1].startswith("curves_")]
    if faith_tabs or curve_figs:
        panels = [table(k) for k in faith_tabs]
        panels += [media([k], k.split("/")[1].replace("_", " ")) for k in curve_figs]
        if any(k.split("/")[1] == "faithfulness" for k in faith_tabs):
            panels.append(wr.BarPlot(title="faithfulness means per run", metrics=[f"mean/{m}" for m in FAITH_METRICS]))
        sections.append(ws.Section(name="Faithfulness: tables and curves", panels=_place(panels), is_open=True))

    if "tables/ablation_abm" in tab_keys:
        cols = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config("explainer.target_layer"), display_name="layer"),
                wr.ParallelCoordinatesPlotColumn(metric=wr.Config("explainer.steps"), display_name="T"),
                *[wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(f"mean/{m}")) for m in FAITH_METRICS]]
        panels = [table("tables/ablation_abm"), wr.ParallelCoordinatesPlot(title="ABM layer × T", columns=cols)]
        sections.append(ws.Section(name="ABM layer × T", panels=_place(panels), is_open=True))

    tests = [k for k in tab_keys if k.split("/")[1] in ("wilcoxon", "ranks")]
    if tests:
        sections.append(ws.Section(name="Paired tests and ranks", panels=_place([table(k) for k in tests])))

    gs = groups(r)
    member = [*gs, report_group(gs, r.out_dir)]
    return ws.Workspace(entity=entity or "", project=project, name=name or f"clip_xai · {', '.join(gs)}"[:120],
                        sections=sections,
                        runset_settings=ws.RunsetSettings(filters=ws.And(ws.Metric("Group").isin(sorted(set(member))))))


def definition(view, groups_: list[str]) -> dict[str, Any]:
    """The JSON definition of a view: the library's view model (``Workspace._to_model``, the
    format ``Workspace.save`` uploads) plus what :func:`save_view` needs."""
    return {"format": FORMAT, "project": view.project, "entity": view.entity or None, "groups": groups_,
            "view": view._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)}


def write_definition(out_dir: Path, view, groups_: list[str]) -> Path:
    """Write ``wandb_view.json`` into ``out_dir`` (atomically); return its path."""
    path = Path(out_dir) / VIEW_FILE
    text = json.dumps(definition(view, groups_), indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def load_view(path: Path):
    """The Workspace of a written definition (a file or the report dir holding it)."""
    from wandb_workspaces.workspaces import Workspace, internal

    path = Path(path)
    path = path / VIEW_FILE if path.is_dir() else path
    if not path.is_file():
        raise ClipXaiError(f"no W&B view definition at {path}",
                           f"pass a report dir written with --wandb (it holds {VIEW_FILE}), or rerun the report with --wandb")
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
        view = Workspace._from_model(internal.View.model_validate(d["view"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ClipXaiError(f"{path} is not a clip_xai W&B view definition ({e})",
                           "rerun the report with --wandb to write it again") from e
    return view


def save_view(path: Path, entity: str | None = None, project: str | None = None):
    """Save a written definition to W&B (needs a login) and return the saved Workspace (its
    ``url`` opens it). The entity is ``entity``, else the definition's, else the logged-in user's
    default entity."""
    view = load_view(path)
    try:
        import wandb

        entity = entity or view.entity or wandb.Api().default_entity
    except Exception as e:  # noqa: BLE001 - no login / no network: say so once
        raise ClipXaiError(f"cannot find the W&B entity to save the view under ({type(e).__name__}: {e})",
                           "run `wandb login` (and `wandb sync` the offline runs), or pass --wandb-entity") from e
    if not entity:
        raise ClipXaiError("no W&B entity to save the view under", "run `wandb login`, or pass --wandb-entity")
    view.entity = entity
    if project:
        view.project = project
    return view.save()
