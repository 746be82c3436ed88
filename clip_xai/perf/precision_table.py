"""Per-method precision for ``precision=auto``: the table the bench's agreement run writes.

For one model and one device, the bench (``python -m clip_xai.perf.bench``, ``make gpu-check``) compares
each method's maps in every lower precision with its strict-fp32 maps on the same images (mean
Spearman). :func:`choose` picks, per method, the cheapest precision whose agreement is at least
``THRESHOLD`` with no undefined pair (cheapest first: fp8, bf16, fp16, tf32), and strict fp32 where
none is. :func:`write` stores that as ``<dir>/<model>__<device>.csv`` (``dir`` is
``<output_root>/precision`` for runs; the bench's ``--precision-tables``). :func:`lookup` reads it
back for a run: a method or a (model, device) without a table runs in strict fp32.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import torch

THRESHOLD = 0.99  # mean Spearman against fp32 (the thesis sweep's goal)
CHEAPEST_FIRST = ["fp8", "bf16", "fp16", "tf32"]
DEFAULT_DIR = Path("outputs") / "precision"
COLUMNS = ["explainer", "precision", "mean_spearman", "min_spearman", "samples", "device", "model"]


def device_key(device: torch.device) -> str:
    """``cpu`` or the GPU's name with non-alphanumerics as ``_`` (``NVIDIA_H100_80GB_HBM3``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


def table_path(root: str | Path, model: str, device: torch.device) -> Path:
    return Path(root) / f"{model}__{device_key(device)}.csv"


def choose(agreement: pd.DataFrame, threshold: float = THRESHOLD) -> pd.DataFrame:
    """One row per explainer: the cheapest precision of ``agreement`` (the bench's agreement
    table: explainer, precision, mean_spearman, min_spearman, samples, nan_pairs) whose mean
    Spearman is ≥ ``threshold`` with no NaN pair; ``fp32`` (agreement 1 by definition) otherwise."""
    rows = []
    for name, group in agreement.groupby("explainer", sort=False):
        by_prec = {r.precision: r for r in group.itertuples()}
        pick = next((p for p in CHEAPEST_FIRST if p in by_prec and by_prec[p].mean_spearman >= threshold
                     and int(getattr(by_prec[p], "nan_pairs", 0)) == 0), None)
        if pick is None:
            rows.append({"explainer": name, "precision": "fp32", "mean_spearman": 1.0, "min_spearman": 1.0,
                         "samples": int(group.samples.iloc[0])})
        else:
            r = by_prec[pick]
            rows.append({"explainer": name, "precision": pick, "mean_spearman": float(r.mean_spearman),
                         "min_spearman": float(r.min_spearman), "samples": int(r.samples)})
    return pd.DataFrame(rows, columns=COLUMNS[:5])


def write(root: str | Path, model: str, device: torch.device, agreement: pd.DataFrame) -> Path:
    """Write the chosen table for (``model``, ``device``); returns its path."""
    table = choose(agreement)
    table["device"], table["model"] = device_key(device), model
    path = table_path(root, model, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    table[COLUMNS].to_csv(path, index=False)
    return path


def lookup(root: str | Path, model: str, device: torch.device, method: str) -> tuple[str, str]:
    """(precision, where it comes from) for ``method``; strict fp32 without a table or a row."""
    path = table_path(root, model, device)
    if not path.is_file():
        return "fp32", f"no agreement table {path}: strict fp32"
    table = pd.read_csv(path)
    row = table[table.explainer == method]
    if row.empty:
        return "fp32", f"{method} is not in {path}: strict fp32"
    r = row.iloc[0]
    return str(r.precision), f"{path}: mean Spearman {float(r.mean_spearman):.4f} against fp32 on {int(r.samples)} images"
