"""End-to-end runs of the real entrypoint (``python -m clip_xai``) on the tiny model.

Slow by nature: each test is a whole run (or a sweep, a launcher, a kill and resume).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from clip_xai.schema import SENSITIVITY_COLUMNS
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("results.parquet") if "report" not in p.parts)


def test_single_run_writes_results(tmp_path):
    """A fresh interpreter (``fresh=True``): the real command line, imports included; the other runs
    here fork a ready entrypoint (tests.helpers.run_cli)."""
    res = run_cli(["model=tiny", "dataset=sample", "explainer=gradcam", "logger=none", f"output_root={tmp_path}"],
                  fresh=True)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    df = pd.read_parquet(run / "results.parquet")
    assert set(SENSITIVITY_COLUMNS) <= set(df.columns) and len(df) == 10
    assert df["explainer"].eq("gradcam").all() and df["eps"].eq(0.0314).all()
    for name in ("summary.json", "config.yaml", "DONE", "examples.npz", "environment.json"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["counts"]["rows"] == 10 and abs(summary["means"]["spearman"] - df["spearman"].mean()) < 1e-12


def test_multirun_2x2_with_wandb_offline_and_cache(tmp_path):
    res = run_cli(["-m", "model=tiny", "explainer=gradcam,selfattn", "perturbation.eps=0.0157,0.0314",
                   "dataset.limit=3", "logger=wandb", "logger.log_images=2", "name=sweep2x2", f"output_root={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    runs = run_dirs(tmp_path / "sweep2x2")
    assert len(runs) == 4
    hits = {}
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        hits[(summary["explainer"], "0.0314" in run.name)] = summary["cache_hits"]
        (wb,) = list((run / "wandb").glob("offline-run-*"))
        tables = list((wb / "files" / "media" / "table").glob("samples_*.table.json"))
        table = json.loads(tables[0].read_text())
        assert len(table["data"]) == 3 and "spearman" in table["columns"]
        assert len(list((wb / "files" / "media" / "images").glob("overlays_*.png"))) == 2
        log = next(wb.glob("run-*.wandb")).read_bytes()
        for needle in (b"sweep2x2", b"sensitivity", b"mean/spearman", b"count/rows", b"perturbation"):
            assert needle in log, needle
    # The clean maps of the second eps job come from the cache written by the first.
    assert hits[("gradcam", True)] == 3 and hits[("gradcam", False)] == 0


def test_resume_after_sigkill_gives_identical_results(tmp_path):
    args = ["model=tiny", "explainer=gradcam", "logger=none", "batch_size=1", "cache=false"]
    full = run_cli([*args, f"output_root={tmp_path}/full"])
    assert full.returncode == 0, full.stderr[-3000:]
    expected = pd.read_parquet(run_dirs(tmp_path / "full")[0] / "results.parquet")

    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "clip_xai", *args, f"output_root={tmp_path}/crash"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = None
    deadline = time.time() + 300
    while time.time() < deadline:
        found = list((tmp_path / "crash").rglob("results.parquet"))
        if found and len(pd.read_parquet(found[0])) >= 3:
            target = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target is not None, "the run never wrote results"
    partial = pd.read_parquet(target)
    assert 3 <= len(partial) < 10 and not (target.parent / "DONE").exists()

    resumed = run_cli([*args, f"output_root={tmp_path}/crash"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = pd.read_parquet(target)
    assert got["sample_id"].is_unique and len(got) == 10
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True))
    summary = json.loads((target.parent / "summary.json").read_text())
    assert summary["run"]["resumed_rows"] == len(partial)


def test_joblib_launcher_runs_two_jobs(tmp_path):
    res = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=tiny", "explainer=gradcam,selfattn",
                   "dataset.limit=2", "logger=none", f"output_root={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(run_dirs(tmp_path)) == 2


def test_submitit_local_launcher(tmp_path):
    res = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "model=tiny",
                   "explainer=gradcam,selfattn", "dataset.limit=2", "logger=none", f"output_root={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(run_dirs(tmp_path)) == 2


def test_unknown_option_is_one_clear_error(tmp_path):
    res = run_cli(["model=tiny", "explainer=nope", f"output_root={tmp_path}"])
    assert res.returncode != 0
    assert "Could not find 'explainer/nope'" in res.stderr and "gradcam" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_eps_is_one_clear_error_and_writes_nothing(tmp_path):
    res = run_cli(["model=tiny", "perturbation.eps=2", "logger=none", f"output_root={tmp_path}"])
    assert res.returncode == 2
    assert "eps=2" in res.stderr and "fix:" in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("results.parquet"))


def test_cuda_only_precision_on_cpu_is_one_clear_error(tmp_path):
    res = run_cli(["model=tiny", "precision=tf32", "device=cpu", "logger=none", f"output_root={tmp_path}"])
    assert res.returncode == 2
    assert "precision=tf32 needs a CUDA device" in res.stderr and "fix:" in res.stderr
    assert "Traceback" not in res.stderr and not list(tmp_path.rglob("environment.json"))


def test_offline_pretrained_model_stops_at_once(tmp_path):
    start = time.time()
    res = run_cli(["model=vit_b16", "logger=none", f"output_root={tmp_path}"])
    assert res.returncode == 2 and time.time() - start < 60
    assert "model=tiny" in res.stderr and "ViT-B-16" in res.stderr
