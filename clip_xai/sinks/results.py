"""Resumable per-run result files: results.parquet rewritten atomically after every batch.

Each append writes the whole table to a temporary file and renames it over results.parquet, so
the file on disk always holds complete batches only: a crash or SIGKILL loses at most the batch
in flight, and a re-run of the same command reads the file back and skips the samples it holds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from clip_xai.provenance import read_environment
from clip_xai.schema import DONE_FILE, RESULTS_FILE, SUMMARY_FILE


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temp file beside ``path``, then rename it over ``path``: readers (and
    concurrent writers) only ever see a complete file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


class ResultsWriter:
    """Holds the rows of one run and mirrors them to ``<run_dir>/results.parquet``."""

    def __init__(self, run_dir: Path, columns: list[str]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULTS_FILE
        self.columns = columns
        self.frame = pd.read_parquet(self.path) if self.path.exists() else pd.DataFrame(columns=columns)
        self.resumed_rows = len(self.frame)

    def done_ids(self) -> set[str]:
        return set(self.frame["sample_id"].astype(str))

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        new = pd.DataFrame(rows, columns=self.columns)
        self.frame = new if self.frame.empty else pd.concat([self.frame, new], ignore_index=True)
        atomic_write(self.path, lambda tmp: self.frame.to_parquet(tmp, index=False))

    def summary(self, metric_columns: list[str], extra: dict) -> dict:
        """Means over finite values plus honest counts (flagged maps, NaNs, skipped images)."""
        f = self.frame
        flags = f["map_flag"].fillna("") if "map_flag" in f else pd.Series([], dtype=str)
        means, nans = {}, {}
        for col in metric_columns:
            vals = pd.to_numeric(f[col], errors="coerce").to_numpy(dtype=float) if col in f else np.array([])
            finite = vals[np.isfinite(vals)]
            means[col] = float(finite.mean()) if finite.size else float("nan")
            nans[col] = int((~np.isfinite(vals)).sum())
        counts = {
            "rows": int(len(f)),
            "samples": int(f["sample_id"].nunique()) if len(f) else 0,
            "bad_images": int((flags == "bad_image").sum()),
            "long_captions": int((flags == "caption_too_long").sum()),
            "truncated_captions": int((f["caption_flag"] == "caption_truncated").sum()) if "caption_flag" in f else 0,
            "flagged_maps": int((~flags.isin(["", "bad_image", "caption_too_long"])).sum()),
            "flags": {k: int(v) for k, v in flags[flags != ""].value_counts().items()},
            "nan_metrics": nans,
        }
        return {"means": means, "counts": counts, **extra}

    def finish(self, summary: dict) -> None:
        """Write summary.json (with the run's recorded environment, see :mod:`clip_xai.provenance`),
        then the DONE marker (a run dir with DONE is complete)."""
        summary.setdefault("environment", read_environment(self.run_dir))
        text = json.dumps(summary, indent=2, default=_json_default)
        atomic_write(self.run_dir / SUMMARY_FILE, lambda tmp: tmp.write_text(text))
        (self.run_dir / DONE_FILE).write_text("ok\n")


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return str(obj)
