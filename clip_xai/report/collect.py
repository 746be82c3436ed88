"""Find run dirs under the user's dirs and gather their results into one tidy frame."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import yaml

from clip_xai.errors import ClipXaiError
from clip_xai.schema import (CONDITION_KEYS, CONFIG_FILE, DONE_FILE, EXAMPLES_FILE, FAITHFULNESS_COLUMNS,
                             HIGHER_IS_BETTER, ID_COLUMNS, LOCALISATION_COLUMNS, OPTIONAL_COLUMNS,
                             RANDOMISATION_COLUMNS, RESULTS_FILE, SENSITIVITY_COLUMNS, key_columns)

log = logging.getLogger(__name__)

SWEEP_FILE = "multirun.yaml"  # Hydra writes it into the sweep dir of a --multirun
REPORT_MARKER = ".clip_xai_report"  # written into report output dirs so they are never read as runs
#: The curve studies' rows (schema.CURVE_HIGHER_IS_BETTER): what the report needs of them beside the
#: per-score list columns curve_<score> and AUCs auc_<score>, which it discovers.
CURVE_STUDIES = ["perturbation_curve", "deletion_insertion"]
STUDY_COLUMNS = {"sensitivity": SENSITIVITY_COLUMNS, "faithfulness": FAITHFULNESS_COLUMNS,
                 "localisation": LOCALISATION_COLUMNS, "randomisation": RANDOMISATION_COLUMNS,
                 **{s: [*ID_COLUMNS, *CONDITION_KEYS[s], "curve_fraction"] for s in CURVE_STUDIES}}
# Rows with the same values here, from different runs, describe the same measurement: the method
# and every identifying column of the results schema.
ROW_KEY = ["method", *key_columns()]
RUN_FIX = "pass dirs that hold clip-xai runs (run dirs with results.parquet and DONE, or sweep dirs above them)"


@dataclass
class Collection:
    """The gathered frame plus what was found and skipped on disk."""

    frame: pd.DataFrame
    runs: list[Path]
    incomplete: list[Path]
    sweeps: list[Path]
    roots: list[Path]
    duplicates_dropped: int = 0
    notes: list[str] = field(default_factory=list)


def _natural(s: str) -> list:
    """Sort key that orders job dirs 2 before 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def find_runs(dirs: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> tuple[list[Path], list[Path]]:
    """Return (complete, incomplete) run dirs: dirs holding results.parquet, split on the DONE file."""
    excluded = {Path(p).resolve() for p in exclude}
    found: dict[Path, None] = {}
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise ClipXaiError(f"{root} is not a directory", RUN_FIX)
        for cur, subdirs, files in os.walk(root):
            here = Path(cur).resolve()
            if here in excluded or REPORT_MARKER in files:
                subdirs[:] = []
            elif RESULTS_FILE in files:
                found.setdefault(here)
                subdirs[:] = []
            else:
                subdirs[:] = sorted((s for s in subdirs if not s.startswith(".")), key=_natural)
    complete = [p for p in found if (p / DONE_FILE).is_file()]
    incomplete = [p for p in found if not (p / DONE_FILE).is_file()]
    for p in incomplete:
        log.warning("skipping incomplete run %s (no %s file: crashed or still running)", p, DONE_FILE)
    return complete, incomplete


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys, keeping scalar leaves only."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif v is None or isinstance(v, (str, int, float, bool)):
            out[key] = v
    return out


def sweep_of(run_dir: Path) -> Path | None:
    """The nearest ancestor holding multirun.yaml (the Hydra sweep dir), if any."""
    return next((p for p in run_dir.parents if (p / SWEEP_FILE).is_file()), None)


def load_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config.yaml, flattened with dots."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ClipXaiError(f"run {run_dir} has results but no {CONFIG_FILE}",
                           "re-run it with clip-xai (which writes the resolved config) or move it out of the report dirs")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ClipXaiError(f"{path} is not valid YAML ({e})", "restore the file or re-run that job") from e
    if not isinstance(cfg, Mapping):
        raise ClipXaiError(f"{path} is not a mapping", "restore the file or re-run that job")
    return flatten(cfg)


def load_run(run_dir: Path, sweep: Path | None = None) -> pd.DataFrame:
    """One run's rows with cfg.<key> columns plus run_dir and sweep."""
    try:
        df = pd.read_parquet(run_dir / RESULTS_FILE)
    except Exception as e:  # corrupt or foreign parquet
        raise ClipXaiError(f"cannot read {run_dir / RESULTS_FILE} ({e})", "re-run that job or remove its dir") from e
    if len(df) and "study" not in df.columns:
        raise ClipXaiError(f"{run_dir / RESULTS_FILE} has no 'study' column, so it is not a clip-xai result",
                           "remove it from the report dirs or re-run it with clip-xai")
    df = df.assign(**{c: v for c, v in OPTIONAL_COLUMNS.items() if c not in df.columns})  # older runs
    for study in df["study"].unique() if len(df) else []:
        if study not in STUDY_COLUMNS:
            raise ClipXaiError(f"run {run_dir} has rows of unknown study {study!r} (known: {sorted(STUDY_COLUMNS)})",
                               "report only runs written by this clip-xai version")
        missing = [c for c in STUDY_COLUMNS[study] if c not in df.columns]
        if missing:
            raise ClipXaiError(f"run {run_dir} ({study}) lacks schema columns {missing}",
                               "it was written by another clip-xai version: re-run it, or leave it out")
    cfg = {f"cfg.{k}": v for k, v in load_config(run_dir).items()}
    return df.assign(**cfg, run_dir=str(run_dir), sweep=str(sweep or run_dir))


def _fmt(v: Any) -> str:
    """Compact value text for method labels."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def method_labels(df: pd.DataFrame) -> pd.Series:
    """Explainer name, plus the modality and cfg.explainer.* values that vary for it within a study."""
    labels = df["explainer"].astype(str)
    expl_cfg = [c for c in df.columns if c.startswith("cfg.explainer.") and c != "cfg.explainer.name"]
    for (_, name), g in df.groupby(["study", "explainer"], sort=False):
        cols = [c for c in ["modality", *expl_cfg] if g[c].nunique(dropna=False) > 1]
        if not cols:
            continue
        for key, sub in g.groupby(cols, dropna=False, sort=False):
            key = key if isinstance(key, tuple) else (key,)
            parts = ", ".join(f"{c.removeprefix('cfg.explainer.')}={_fmt(v)}" for c, v in zip(cols, key))
            labels.loc[sub.index] = f"{name}[{parts}]"
    return labels


def _tidy_types(df: pd.DataFrame) -> pd.DataFrame:
    """Make object cfg columns with mixed Python types all-string so parquet can hold them."""
    for c in [c for c in df.columns if c.startswith("cfg.") and df[c].dtype == object]:
        kinds = {type(v) for v in df[c].dropna()}
        if len(kinds) > 1:
            df[c] = df[c].map(lambda v: v if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    return df


def _dedupe(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop rows repeated identically across runs; raise if runs disagree on the same measurement."""
    key = [c for c in ROW_KEY if c in df.columns]
    metrics = [c for c in [*HIGHER_IS_BETTER, "road_morf", "road_lerf", "sim_orig"] if c in df.columns]
    metrics += [c for c in df.columns if c.startswith("auc_")]
    exact = df.duplicated([*key, *metrics], keep="first")
    df2 = df[~exact]
    clash = df2[df2.duplicated(key, keep=False)]
    if len(clash):
        runs = clash.groupby(key, dropna=False)["run_dir"].unique()
        runs = runs[runs.map(len) > 1]
        if len(runs):
            a, b = runs.iloc[0][:2]
            ra, rb = df2[df2.run_dir == a].iloc[0], df2[df2.run_dir == b].iloc[0]
            diff = [c.removeprefix("cfg.") for c in df.columns if c.startswith("cfg.")
                    and not (pd.isna(ra[c]) and pd.isna(rb[c])) and ra[c] != rb[c]]
            raise ClipXaiError(
                f"runs {a} and {b} both hold different results for method {clash.iloc[0]['method']!r} on the same "
                f"samples (the same identifying columns: {', '.join(key_columns())}); their configs differ in "
                f"{diff or 'nothing'}",
                "report them separately (one call each), or pass only one of them")
    return df2.reset_index(drop=True), int(exact.sum())


def collect(dirs: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> Collection:
    """Gather every complete run under `dirs` into one frame (raises ClipXaiError when there is none)."""
    roots = [Path(d) for d in dirs]
    if not roots:
        raise ClipXaiError("no dirs given", RUN_FIX)
    complete, incomplete = find_runs(roots, exclude)
    if not complete:
        extra = f" ({len(incomplete)} incomplete run(s) without {DONE_FILE} were skipped)" if incomplete else ""
        raise ClipXaiError(f"no complete runs found under {', '.join(map(str, roots))}{extra}",
                           f"{RUN_FIX}; wait for running jobs to write {DONE_FILE}")
    sweeps = {r: sweep_of(r) for r in complete}
    frames = [load_run(r, sweeps[r]) for r in complete]
    frames = [f for f in frames if len(f)]
    if not frames:
        raise ClipXaiError(f"the {len(complete)} run(s) found hold no result rows",
                           "check the runs' logs (empty dataset split or max_samples=0?) and re-run them")
    df = _tidy_types(pd.concat(frames, ignore_index=True, sort=False))
    df["method"] = method_labels(df)
    df, dropped = _dedupe(df)
    first = [c for c in dict.fromkeys([c for cols in STUDY_COLUMNS.values() for c in cols]) if c in df.columns]
    cfg = sorted(c for c in df.columns if c.startswith("cfg."))
    rest = [c for c in df.columns if c not in first and c not in cfg]
    df = df[[*first, "method", *[c for c in rest if c != "method"], *cfg]]
    uniq_sweeps = sorted({s for s in sweeps.values() if s is not None}, key=lambda p: _natural(str(p)))
    return Collection(df, complete, incomplete, uniq_sweeps, roots, dropped)


def random_weight_models(frame: pd.DataFrame) -> list[str]:
    """Models whose runs had no pretrained weights (``model.pretrained`` null/false)."""
    if "cfg.model.pretrained" not in frame.columns or "model" not in frame.columns:
        return []
    w = frame["cfg.model.pretrained"]
    random = w.isna() | w.astype(str).str.lower().isin(["false", "none", ""])
    return sorted(frame.loc[random, "model"].astype(str).unique())


def example_index(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Sensitivity runs with examples.npz: method, setting and eps of each (arrays are read later)."""
    out = []
    sens = df[df["study"] == "sensitivity"] if "study" in df.columns else df.iloc[:0]
    for run_dir, g in sens.groupby("run_dir", sort=False):
        path = Path(run_dir) / EXAMPLES_FILE
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                if not {"sample_id", "image", "map_clean", "image_pert", "map_pert", "eps"} <= set(z.files):
                    log.warning("skipping %s: it lacks the sensitivity example arrays", path)
                    continue
                eps = float(np.ravel(z["eps"])[0])  # (n,) per sample, one ε per run
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable %s (%s)", path, e)
            continue
        for method, m in g.groupby("method", sort=False):
            r = m.iloc[0]
            out.append({"path": path, "method": method, "dataset": r["dataset"], "model": r["model"],
                        "perturbation": r.get("perturbation", ""), "eps": eps})
    return out
