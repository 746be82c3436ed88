"""Progress lines: silent for short tasks, throttled, with a job ETA (lower bound before a batch ends)."""
from __future__ import annotations

import pytest

from clip_xai import progress


@pytest.fixture(autouse=True)
def shown(monkeypatch):
    monkeypatch.setenv("CLIP_XAI_PROGRESS", "1")


@pytest.fixture()
def instant(monkeypatch):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)


def test_short_tasks_print_nothing(capsys):
    with progress.task(100, "quick") as t:
        for _ in range(100):
            t.update()
    assert list(progress.steps(5, "quick")) == list(range(5))
    assert "quick" not in capsys.readouterr().err


def test_steps_report_each_step_and_the_job_eta(instant, capsys):
    with progress.Job(4, "job") as job:
        assert progress._job is job
        list(progress.steps(3, "m2ib", samples=2))
        first = capsys.readouterr().err
        job.update(2)  # a batch finished: the ETA is now measured, no longer a lower bound
        list(progress.steps(3, "m2ib", samples=2))
        second = capsys.readouterr().err
    assert progress._job is None
    assert "m2ib" in first and "3/3" in first and "job ETA ≥" in first
    assert "job ETA " in second and "job ETA ≥" not in second


def test_job_eta_from_the_task_then_from_batches(monkeypatch):
    clock = iter([0.0, 10.0, 10.0, 20.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    job = progress.Job(8, "job")  # t = 0
    # 10 s for a quarter of a 2-sample task: >= 4 batches x 40 s - 10 s elapsed
    assert job.eta(10.0, 0.25, 2) == "≥2:30"  # t = 10
    job.update(2)  # t = 10: 5 s per sample
    assert job.eta(0.0, 0.0, 2) == "0:20"  # t = 20: 6 samples x 5 s - 10 s into the batch
    job.close()
    assert progress.fmt_seconds(3725) == "1:02:05" and progress.fmt_seconds(65) == "1:05"
