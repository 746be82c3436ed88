"""The report's W&B workspace view, offline: the definition written beside a report (sections,
panels, the keys they read, the run filter), loading and saving it without a server, and the
report run's group and overview keys. Nothing here contacts W&B: the report run's logging and
``Workspace.save`` are replaced by recorders."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from clip_xai.errors import ClipXaiError
from clip_xai.report import wandb_log, wandb_view
from clip_xai.report.__main__ import main
from clip_xai.report.contents import Report
from clip_xai.report.index import make_report
from tests.test_report import EPS, N, cfg, faith_mean, faith_rows, sens_rows, write_run
from tests.test_report_curves import curve_rows


def build(root: Path) -> Path:
    """Three studies in three sweeps: sensitivity (2 methods × 2 ε), an abm layer × T
    faithfulness sweep beside gradcam, and a perturbation_curve sweep."""
    for sweep in ("sens_sweep", "faith_sweep", "curve_sweep"):
        (root / sweep).mkdir(parents=True)
        (root / sweep / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for expl in ("eclip", "gradcam"):
        for eps in EPS:
            rows = sens_rows(expl, eps, job).assign(sim_diff=float("nan"))  # no Δs figures: fewer to draw
            write_run(root / "sens_sweep" / str(job), cfg("sensitivity", {"name": expl}, eps), rows)
            job += 1
    for layer in (8, 10):
        for steps in (5, 10):
            write_run(root / "faith_sweep" / str(job), cfg("faithfulness", {"name": "abm", "target_layer": layer,
                                                                             "steps": steps}),
                      faith_rows("abm", job, faith_mean(layer, steps)))
            job += 1
    write_run(root / "faith_sweep" / str(job), cfg("faithfulness", {"name": "gradcam"}), faith_rows("gradcam", job, 15.0))
    for expl, slope in (("eclip", 1.2), ("gradcam", 0.8)):
        job += 1
        rows = curve_rows(expl, "perturbation_curve", "positive", "gt", slope, job, ("hit",), n=N, model="ViT-B-16")
        write_run(root / "curve_sweep" / str(job), cfg("perturbation_curve", {"name": expl}),
                  rows.assign(dataset="coco", sample_id=[f"s{i:03d}" for i in range(N)]))
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, list[dict], Report]:
    """One report with --wandb; the W&B run's logging is recorded, never sent."""
    root = build(tmp_path_factory.mktemp("view"))
    calls: list[dict] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wandb_log, "log_report", lambda *a, **kw: calls.append({"args": a, **kw}))
        r = make_report([root], out=root / "out", n_boot=50, use_wandb=True, wandb_entity="team")
    return root / "out", calls, r


def panels(section) -> list[tuple[str, object]]:
    return [(type(p).__name__, p) for p in section.panels]


def test_definition_sections_and_panels(report) -> None:
    out, _, _ = report
    d = json.loads((out / wandb_view.VIEW_FILE).read_text())
    assert d["format"] == wandb_view.FORMAT and d["project"] == "clip_xai" and d["entity"] == "team"
    assert d["groups"] == ["curve_sweep", "faith_sweep", "sens_sweep"]
    view = wandb_view.load_view(out)
    assert [s.name for s in view.sections] == ["Overview", "Sensitivity: ε curves per method",
                                               "Faithfulness: tables and curves", "ABM layer × T",
                                               "Paired tests and ranks"]
    ov = dict((k, p) for k, p in panels(view.sections[0]))
    assert ov["MediaBrowser"].media_keys == ["figures/overview"]
    assert ov["WeavePanelSummaryTable"].table_name == "tables/overview"
    assert "### coco · ViT-B-16" in ov["MarkdownPanel"].markdown
    sens = panels(view.sections[1])
    assert sens[0][1].media_keys == ["figures/sensitivity_vs_eps"]
    scatter = [p for k, p in sens if k == "ScatterPlot"]
    assert [(p.x.name, p.y.name) for p in scatter] == [("perturbation.eps", f"mean/{m}") for m in ("spearman", "ssim", "topk")]
    faith = panels(view.sections[2])
    assert [p.table_name for k, p in faith if k == "WeavePanelSummaryTable"] == [
        "tables/faithfulness", "tables/road", "tables/auc_perturbation_curve"]
    assert [p.media_keys for k, p in faith if k == "MediaBrowser"] == [["figures/curves_perturbation_curve"]]
    abm = dict(panels(view.sections[3]))
    assert abm["WeavePanelSummaryTable"].table_name == "tables/ablation_abm"
    assert [c.metric.name for c in abm["ParallelCoordinatesPlot"].columns][:2] == ["explainer.target_layer", "explainer.steps"]
    assert view.runset_settings.filters == "Metric(\"Group\") in ['curve_sweep', 'faith_sweep', 'report-out', " \
                                           "'sens_sweep']"  # the sweeps' runs and the report run


def test_every_panel_reads_a_key_the_report_run_logs(report) -> None:
    """Media keys are the report's PNGs (logged as figures/<stem>), table names its CSVs (tables/<stem>)."""
    out, _, _ = report
    view = wandb_view.load_view(out / wandb_view.VIEW_FILE)
    for s in view.sections:
        for p in s.panels:
            for key in getattr(p, "media_keys", []):
                assert (out / "figures" / f"{key.removeprefix('figures/')}.png").is_file(), key
            if hasattr(p, "table_name"):
                assert (out / "tables" / f"{p.table_name.removeprefix('tables/')}.csv").is_file(), p.table_name


def test_report_run_group_and_overview_keys(report) -> None:
    out, calls, _ = report
    assert len(calls) == 1
    call = calls[0]
    assert call["group"] == "report-out" and call["entity"] == "team" and call["mode"] == "offline"
    summary = call["args"][3]
    keys = [k for k in summary if k.startswith("overview/coco/ViT-B-16/mean rank")]
    assert keys and all(1.0 <= summary[k] for k in keys)
    index = (out / "index.md").read_text()
    assert index.index("## Overview") < index.index("## Counts")  # the overview opens the report
    assert "[wandb_view.json](wandb_view.json)" in index and f"--wandb-view {out}" in index
    assert (out / "figures" / "overview.png").is_file()


def test_save_view_later_without_a_server(report, monkeypatch) -> None:
    import wandb
    from wandb_workspaces.workspaces import Workspace

    out, _, _ = report
    saved: list[Workspace] = []
    monkeypatch.setattr(Workspace, "save", lambda self: saved.append(self) or self)
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: pytest.fail("no server call when the entity is known"))
    view = wandb_view.save_view(out, entity="other", project="proj")
    assert saved == [view] and view.entity == "other" and view.project == "proj"
    assert view._to_model().spec.section.panel_bank_config.sections[0].name == "Overview"
    view = wandb_view.save_view(out / wandb_view.VIEW_FILE)  # the definition's entity
    assert view.entity == "team"


def test_bad_view_input(report, tmp_path: Path, capsys) -> None:
    with pytest.raises(ClipXaiError, match="no W&B view definition"):
        wandb_view.load_view(tmp_path)
    (tmp_path / wandb_view.VIEW_FILE).write_text(json.dumps({"format": "other", "view": {}}))
    with pytest.raises(ClipXaiError, match="not a clip_xai W&B view definition"):
        wandb_view.load_view(tmp_path)
    assert main(["--wandb-view", str(tmp_path)]) == 2 and "fix:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--wandb-view", str(tmp_path), str(tmp_path)])  # a view or dirs, not both
    with pytest.raises(SystemExit):
        main([])


def test_sections_follow_what_the_report_holds(report) -> None:
    """No ABM section without the layer × T table, no curves without curve figures."""
    _, _, r = report
    less = dataclasses.replace(r, tables=[it for it in r.tables if not it.title.startswith(("ABM", "perturbation_curve"))],
                               figures=[it for it in r.figures if not it.title.startswith("perturbation_curve")])
    view = wandb_view.build(less, project="p")
    assert "ABM layer × T" not in [s.name for s in view.sections]
    faith = next(s for s in view.sections if s.name.startswith("Faithfulness"))
    keys = [k for p in faith.panels for k in [*getattr(p, "media_keys", []), getattr(p, "table_name", "")]]
    assert not [k for k in keys if "curve" in k] and "tables/faithfulness" in keys
