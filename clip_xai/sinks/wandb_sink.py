"""Weights & Biases logging that can never cost local results.

Offline mode (the default) needs no login: the run lands in ``<run_dir>/wandb/offline-run-*``
and can be uploaded later with ``wandb sync``. Every W&B call is guarded: a failure is counted
and warned about, the study goes on, and ``finish()`` always runs (also on error).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from clip_xai.provenance import read_environment

log = logging.getLogger(__name__)


class WandbSink:
    """One W&B run per job: resolved config (plus the run's ``environment.json`` under
    ``environment``, see :mod:`clip_xai.provenance`), per-sample table, summary means, overlay images."""

    def __init__(self, run_dir: Path, config: dict, group: str, job_type: str, name: str,
                 mode: str = "offline", project: str = "clip_xai", entity: str | None = None,
                 tags: list[str] | None = None, log_images: int = 4):
        self.errors = 0
        self.log_images = log_images
        self.run = None
        try:
            import wandb

            self.run = wandb.init(project=project, entity=entity, group=group, job_type=job_type, name=name,
                                  config={**config, "environment": read_environment(run_dir)}, dir=str(run_dir), mode=mode, tags=list(tags or []), reinit="finish_previous")
        except Exception as exc:  # noqa: BLE001 - W&B must never break a study
            self._fail("init", exc)

    def _fail(self, what: str, exc: Exception) -> None:
        self.errors += 1
        log.warning("W&B %s failed (%s: %s); local results are unaffected", what, type(exc).__name__, exc)

    def log_overlays(self, images: np.ndarray, maps: dict[str, np.ndarray], captions: list[str]) -> None:
        """Log up to ``log_images`` side-by-side overlays (one per sample) of each map kind."""
        if self.run is None or self.log_images <= 0:
            return
        try:
            import wandb

            from clip_xai.overlay import overlay

            panels = []
            for i in range(min(self.log_images, len(images))):
                row = np.concatenate([overlay(images[i], maps[k][i]) for k in maps], axis=1)
                panels.append(wandb.Image(row, caption=f"{captions[i]} | {' vs '.join(maps)}"))
            self.run.log({"overlays": panels})
        except Exception as exc:  # noqa: BLE001
            self._fail("image logging", exc)

    def finish(self, frame=None, summary: dict | None = None) -> None:
        """Log the per-sample table and the summary, then close the run (always)."""
        if self.run is None:
            return
        try:
            import wandb

            if frame is not None and len(frame):
                self.run.log({"samples": wandb.Table(dataframe=frame.astype({c: str for c in frame.columns if frame[c].dtype == object}))})
            if summary:
                for key, value in summary.get("means", {}).items():
                    if isinstance(value, float) and math.isfinite(value):
                        self.run.summary[f"mean/{key}"] = value
                for key, value in summary.get("counts", {}).items():
                    if isinstance(value, (int, float)):
                        self.run.summary[f"count/{key}"] = value
        except Exception as exc:  # noqa: BLE001
            self._fail("table/summary logging", exc)
        finally:
            try:
                self.run.finish()
            except Exception as exc:  # noqa: BLE001
                self._fail("finish", exc)
            self.run = None
