"""Wall-clock timing of device work, in one place for the bench, the baselines, the peaks and the GPU check.

CUDA queues kernels asynchronously: a timer read right after a call measures the launch, not the
work. Every timer here waits for the device before it starts and before it stops
(:func:`sync`). Two summaries of repeated calls are offered: :func:`median_time` (typical cost,
after one untimed warm-up; the bench's rows) and :func:`best_time` (the fastest call, after optional
warm-ups: the least disturbed measurement, for peaks and for side-by-side baselines).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch


def sync(device: torch.device | str | None) -> None:
    """Wait until ``device`` has finished its queued work (no-op off CUDA)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device | str | None) -> float:
    """Seconds of one ``fn()`` including the device work it queued."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], device: torch.device | str | None, repeats: int,
                slow: float = 2.0) -> float:
    """Seconds per call: median of ``repeats`` timed calls after one untimed warm-up (so every timed
    call runs with the caches and compiled graphs the warm-up left). When the first timed call is
    slower than ``slow`` seconds it is the measurement (repeating it would only add minutes)."""
    fn()
    sync(device)
    first = timed_call(fn, device)
    if first > slow or repeats <= 1:
        return first
    times = sorted([first] + [timed_call(fn, device) for _ in range(repeats - 1)])
    return times[len(times) // 2]


def best_time(fn: Callable[[], object], device: torch.device | str | None, repeats: int, warmup: int = 0) -> float:
    """Seconds of the fastest of ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return min(timed_call(fn, device) for _ in range(max(1, repeats)))


class PhaseTimer:
    """Seconds spent in named phases, summed over repeated entries (``with timer.phase("x"):``).

    On CUDA each phase ends with a device wait, so a phase is charged for the kernels it queued
    (costs a pipeline bubble per phase: a few microseconds against milliseconds of work).
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)

    def rounded(self, digits: int = 4) -> dict[str, float]:
        return {k: round(v, digits) for k, v in self.seconds.items()}
