"""The prepared GPU check: its refusal without a GPU, its projection arithmetic by hand, per-step
failure handling, and the dry run (every step on the tiny model on the CPU) with the docs tables."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from clip_xai.perf import gpu_check, tables
from tests.helpers import REPO

ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_stops_at_once_with_one_line(tmp_path, capsys):
    """In this process: ``python -m clip_xai.perf.gpu_check`` is ``sys.exit(main())``."""
    assert gpu_check.main(["--out", str(tmp_path / "gc")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no CUDA GPU" in err
    assert not (tmp_path / "gc").exists()


def test_one_process_is_refused_outside_the_dry_run(tmp_path, capsys):
    assert gpu_check.main(["--one-process", "--out", str(tmp_path / "gc")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--dry" in err and not (tmp_path / "gc").exists()


PROV = {"device": "test", "driver": "none", "torch": "x", "date": "d"}


def test_projection_by_hand(tmp_path):
    # method a: 10 images, 4 eps jobs (clean maps computed in the first, cached after); b: 2 images, 1 job
    rows = []
    for i, eps in enumerate(gpu_check.THESIS_EPS):
        rows += [("a", eps, 10, "model_build", 2.0), ("a", eps, 10, "clean_maps", 1.0 if i == 0 else 0.0),
                 ("a", eps, 10, "perturbed_maps", 1.0), ("a", eps, 10, "perturbation", 0.5)]
    rows += [("b", 0.0157, 2, "model_build", 3.0), ("b", 0.0157, 2, "perturbed_maps", 2.0)]
    pd.DataFrame(rows, columns=["explainer", "eps", "images", "phase", "seconds"]).assign(precision="fp16").to_csv(
        tmp_path / "sweep_phases.csv", index=False)
    pd.DataFrame([("a", "-", "fp32", 50.0), ("a", "-", "reference (fp16)", 100.0), ("b", "-", "fp32", 10.0),
                  ("b", "-", "reference (fp16)", 10.0), ("fgsm (perturbation)", "-", "fp32", 100.0),
                  ("fgsm (perturbation)", "-", "reference (fp16)", 200.0)],
                 columns=["explainer", "cache", "precision", "images_per_s"]).to_csv(tmp_path / "bench.csv", index=False)
    pd.DataFrame([("a", "fp16", 0.999), ("b", "fp16", 0.95)], columns=["explainer", "precision", "mean_spearman"]).to_csv(
        tmp_path / "agreement.csv", index=False)
    (tmp_path / "precision").mkdir()
    pd.DataFrame([("a", "fp16"), ("b", "fp32")], columns=["explainer", "precision"]).to_csv(
        tmp_path / "precision" / "m__cpu.csv", index=False)
    got = gpu_check.projection_table(tmp_path, PROV).set_index("precision")
    k_a, k_b = 5285 / 10, 5285 / 2
    as_run = 4 * 2 + (1 + 4 * 1 + 4 * 0.5) * k_a + 3 + 2 * k_b
    fp32 = 4 * 2 + (1 + 4 * 1) * 2 * k_a + 4 * 0.5 * 2 * k_a + 3 + 2 * k_b  # a's maps and FGSM at half the rate
    auto = 4 * 2 + (1 + 4 * 1 + 4 * 0.5) * k_a + 3 + 2 * k_b  # a in fp16, b in fp32 (same rate for b)
    assert got.loc["fp16 (as run)", "projected_h"] == pytest.approx(as_run / 3600)
    assert got.loc["fp32", "projected_h"] == pytest.approx(fp32 / 3600)
    assert got.loc["auto", "projected_h"] == pytest.approx(auto / 3600)
    assert got.loc["fp16 (as run)", "worst_agreement"] == "b (0.9500)" and not got.loc["fp16 (as run)", "meets_goal"]
    assert got.loc["auto", "worst_agreement"] == "a (0.9990)" and got.loc["auto", "per_method_precision"] == "a=fp16, b=fp32"
    assert not got.loc["auto", "meets_goal"]  # 1 h goal: (8 + 3700 + 3 + 5285) s is 2.5 h
    assert got.loc["fp32", "largest_share"].startswith("a ")


def test_a_step_out_of_time_is_recorded_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.STEPS, "cuda_tests", (1, 1))
    status = gpu_check.run_step("cuda_tests", tmp_path, dry=True)
    assert status["status"] == "timed out after 1 s" and (tmp_path / "logs" / "cuda_tests.log").is_file()
    report = gpu_check.write_report(tmp_path, True, PROV).read_text()
    assert "not written" in report and "DRY RUN" in report


@pytest.mark.slow
def test_dry_run_writes_the_report_and_the_doc_tables(tmp_path):
    """The slowest test of the suite, on purpose: every step of the check end to end (every explainer
    benched at two precisions, 9 methods x 4 eps through the entrypoint). It runs as the command line
    does, in one child process with ``--one-process`` (the steps one after the other there: four
    interpreter start-ups fewer); a step's own child and its time limit are tested above."""
    out = tmp_path / "gc"
    res = subprocess.run([sys.executable, "-m", "clip_xai.perf.gpu_check", "--dry", "--one-process", "--out", str(out)],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=9000)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    steps = pd.read_csv(out / "steps.csv")
    assert steps.step.tolist() == list(gpu_check.STEPS) and (steps.status == "ok").all(), steps.to_string()
    assert all((out / "logs" / f"{name}.log").is_file() for name in gpu_check.STEPS)
    for name in ("steps", "cuda_tests", "bench", "agreement", "refused", "rise_compile", "rows", "sweep_phases", "projection"):
        df = pd.read_csv(out / f"{name}.csv")
        assert {"device", "driver", "torch", "date"} <= set(df.columns), name
        assert "precision" in df.columns and len(df), name
    bench = pd.read_csv(out / "bench.csv")
    assert set(bench.precision) == {"fp32", "bf16"}
    not_run = pd.read_csv(out / "refused.csv").set_index("precision").refused
    assert set(not_run.index) == {"tf32", "reference", "fp8"} and "needs a CUDA device" in not_run["tf32"]
    assert "FP8 tensor cores" in not_run["fp8"] and "rows are the fp32 rows" in not_run["reference"]
    assert (bench.peak_share_pct <= 100).all() and set(bench.cache) == {"-", "cold", "warm"}
    rise = pd.read_csv(out / "rise_compile.csv").set_index("what")
    assert rise.loc["compiled (eager)", "max_abs_diff"] < 1e-4  # the compiled path gives the eager maps
    sweep = pd.read_csv(out / "sweep_phases.csv")
    assert sweep.explainer.nunique() == 9 and sweep.eps.nunique() == 4
    assert set(gpu_check.SWEEP_PHASES) - {"other"} <= set(sweep.phase)
    assert (out / "precision" / "tiny__cpu.csv").is_file()
    report = (out / "report.md").read_text()
    assert "DRY RUN" in report and "## 5. Thesis sweep" in report and "not written" not in report

    doc = tmp_path / "performance.md"
    assert tables.main([str(out), "--doc", str(doc)]) == 0 and "Projected full thesis sweep" in doc.read_text()

DRY_CSVS = REPO / "tests" / "data" / "gpu_check_dry"  # a dry run's CSVs (CPU, tiny model, 2026-12-06)


def test_doc_tables_from_the_dry_run_csvs(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\nintro\n\n{tables.BEGIN}\nSTALE TABLE\n{tables.END}\n\nafter\n")
    assert tables.main([str(DRY_CSVS), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "STALE TABLE" not in text and text.startswith("# Performance\n\nintro") and text.endswith("after\n")
    between = text.split(tables.BEGIN)[1].split(tables.END)[0]
    bench = pd.read_csv(DRY_CSVS / "bench.csv")
    rise_fp32 = bench[(bench.explainer == "rise") & (bench.precision == "fp32")].images_per_s_at_defaults.max()
    row = next(ln for ln in between.splitlines() if ln.startswith("| rise "))
    assert f"{rise_fp32:.4g}" in row  # the rate table holds the CSV's number at the defaults
    for title in ("Images/s per method and precision", "cold (unique captions) and warm rows", "Map agreement",
                  "RISE compiled vs eager", "PGD, map-attack", "Projected full thesis sweep"):
        assert title in between, title
    assert "DRY RUN" in between and "torch 2.14.1" in between and "driver none" in between
    assert tables.main([str(DRY_CSVS), "--doc", str(doc)]) == 0 and doc.read_text() == text  # idempotent
    bare = tmp_path / "bare.md"
    bare.write_text("# Performance\n")
    assert tables.main([str(DRY_CSVS), "--doc", str(bare)]) == 0
    assert bare.read_text().count(tables.BEGIN) == 1 and "## Measured by the GPU check" in bare.read_text()
    assert tables.main([str(tmp_path / "nothing"), "--doc", str(bare)]) == 2
