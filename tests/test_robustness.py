"""Faults never cost results: OOM halves the batch, W&B failures are counted, not fatal."""
from __future__ import annotations

import pandas as pd
import torch

from clip_xai.__main__ import run
from clip_xai.studies.sensitivity import SensitivityStudy
from tests.helpers import compose_cfg


def _run(tmp_path, name, overrides):
    cfg = compose_cfg(["model=tiny", f"output_root={tmp_path}", "dataset.limit=5", "cache=false", *overrides])
    summary = run(cfg, tmp_path / name, None, "test")
    return summary, pd.read_parquet(tmp_path / name / "results.parquet")


def test_out_of_memory_halves_the_batch(tmp_path, monkeypatch):
    ref_summary, ref = _run(tmp_path, "ref", ["logger=none", "batch_size=2"])
    original = SensitivityStudy.process

    def flaky(self, ctx, prep):
        if len(prep.batch) > 2:
            raise torch.OutOfMemoryError("simulated")
        return original(self, ctx, prep)

    monkeypatch.setattr(SensitivityStudy, "process", flaky)
    summary, got = _run(tmp_path, "oom", ["logger=none", "batch_size=8"])
    assert summary["run"]["oom_splits"] >= 2 and len(got) == 5
    cols = ["sample_id", "spearman", "ssim", "topk", "sim_orig", "sim_pert"]
    pd.testing.assert_frame_equal(got[cols], ref[cols], atol=1e-5, rtol=1e-5)


def test_wandb_failure_keeps_local_results(tmp_path, monkeypatch):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken)
    summary, got = _run(tmp_path, "wb", ["logger=wandb", "logger.mode=offline"])
    assert len(got) == 5 and summary["run"]["wandb_errors"] == 1
    assert (tmp_path / "wb" / "DONE").exists()


def test_wandb_logging_failure_still_finishes_run(tmp_path, monkeypatch):
    import wandb

    finished = []
    real_init = wandb.init

    def init(*args, **kwargs):
        r = real_init(*args, **kwargs)
        real_finish = r.finish
        r.finish = lambda *a, **k: (finished.append(True), real_finish(*a, **k))
        return r

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(wandb, "Table", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("table broke")))
    summary, got = _run(tmp_path, "wb2", ["logger=wandb", "logger.mode=offline"])
    assert finished and summary["run"]["wandb_errors"] == 1 and len(got) == 5


def test_precision_bf16_runs_on_cpu(tmp_path):
    summary, got = _run(tmp_path, "bf16", ["logger=none", "precision=bf16", "explainer=gradcam"])
    assert summary["run"]["precision"] == "bf16" and got["spearman"].notna().all()
