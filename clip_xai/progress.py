"""Progress for long jobs and inside long methods: throttled, with an ETA for the whole job.

Two levels. The study loop opens a :class:`Job` (samples of one run). Inside it, a long method
(RISE masks, bottleneck or PGD steps) reports its own units through :func:`task` or
:func:`steps`. A task's line appears only once the task has run for ``DELAY_S`` seconds, and is
refreshed at most every ``INTERVAL_S`` seconds. It shows the method's units done, the ETA of this
call and an ETA for the job. Between refreshes, ``update`` costs one clock read, so hot loops do
not slow down.

The job ETA comes from the completed batches when there are any. Before the first batch
completes, it is extrapolated from the running task and printed as a lower bound ("≥"), because
a batch may call the method more than once (the clean and the perturbed map). Everything goes to
stderr through tqdm. ``CLIP_XAI_PROGRESS=0`` turns off the task lines.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator

from tqdm import tqdm

DELAY_S = 3.0  # a task shorter than this prints nothing
INTERVAL_S = 3.0  # at most one refresh of a task's line per this many seconds


def _enabled() -> bool:
    return os.environ.get("CLIP_XAI_PROGRESS", "1") not in ("0", "false", "off")


def fmt_seconds(sec: float) -> str:
    """Seconds as h:mm:ss (or m:ss below an hour)."""
    sec = max(0, int(round(sec)))
    h, rest = divmod(sec, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Job:
    """The samples of one run: a tqdm bar plus the timing that inner tasks need for the job ETA.

    Creating a Job makes it the current one (tasks report against it); ``close`` restores the
    previous one.
    """

    def __init__(self, total: int, desc: str):
        global _job
        self.total, self.done = int(total), 0
        self.start = self.last_batch = time.monotonic()
        self.bar = tqdm(total=total, desc=desc, unit="sample", leave=False)
        self._outer, _job = _job, self

    def update(self, n: int) -> None:
        """``n`` more samples finished (called once per batch)."""
        self.done += n
        self.last_batch = time.monotonic()
        self.bar.update(n)

    def close(self) -> None:
        global _job
        self.bar.close()
        if _job is self:
            _job = self._outer

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def eta(self, task_elapsed: float, task_fraction: float, task_samples: int) -> str:
        """The job's remaining time as text, given the running task's progress."""
        now = time.monotonic()
        if self.done > 0:  # measured per-sample time of the finished batches
            per_sample = (self.last_batch - self.start) / self.done
            return fmt_seconds((self.total - self.done) * per_sample - (now - self.last_batch))
        if task_fraction <= 0:
            return "?"
        task_total = task_elapsed / task_fraction
        batches = self.total / max(task_samples, 1)
        return "≥" + fmt_seconds(batches * task_total - task_elapsed)


_job: Job | None = None


class Task:
    """Units of one long method call (masks, steps) for ``samples`` samples; see module docstring."""

    def __init__(self, total: int, desc: str, unit: str = "step", samples: int = 1):
        self.total, self.desc, self.unit, self.samples = int(total), desc, unit, int(samples)
        self.done = 0
        self.start = self._last = time.monotonic()
        self.bar: tqdm | None = None
        self.enabled = _enabled() and self.total > 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= INTERVAL_S and now - self.start >= DELAY_S:
            self._refresh(now)

    def _refresh(self, now: float) -> None:
        self._last = now
        elapsed = now - self.start
        if self.bar is None:  # created late (short tasks print nothing); its clock starts with the task
            self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, leave=False, mininterval=0, delay=1e-9,
                            smoothing=0)
            self.bar.start_t -= elapsed
        if _job is not None:
            self.bar.set_postfix_str(f"job ETA {_job.eta(elapsed, self.done / self.total, self.samples)}",
                                     refresh=False)
        self.bar.update(self.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def task(total: int, desc: str, unit: str = "step", samples: int = 1) -> Task:
    """A :class:`Task` to use as a context manager: ``with task(n, "rise") as t: ... t.update(k)``."""
    return Task(total, desc, unit, samples)


def steps(n: int, desc: str, samples: int = 1) -> Iterator[int]:
    """``range(n)`` that reports each finished step; for optimisation loops (bottleneck, PGD)."""
    with Task(n, desc, "step", samples) as t:
        for i in range(n):
            yield i
            t.update()
