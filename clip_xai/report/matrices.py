"""Report section for explainers with a caption-token × image-patch matrix (``interactions``).

For every sensitivity run whose examples.npz carries ``matrix_clean``/``matrix_pert``, one figure
per run: for each saved sample, the image, the clean matrix and the perturbed matrix (rows = the
caption's real tokens, 0 = start token; columns = patches in raster order), on one symmetric
colour scale per sample (red positive, blue negative; the raw values, not min-max). Plus a table of
mean ``matrix_spearman`` per method and ε.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clip_xai.report import figures, stats, tables
from clip_xai.report.collect import example_index
from clip_xai.report.contents import Item, Report

MATRIX_ARRAYS = ("matrix_clean", "matrix_pert", "matrix_rows")


def matrix_figure(path: Path, out_dir: Path, name: str, title: str, n_samples: int = 4) -> list[Path] | None:
    """The figure of one run's examples.npz (None when it has no matrices)."""
    with np.load(path, allow_pickle=False) as z:
        if not set(MATRIX_ARRAYS) <= set(z.files):
            return None
        ex = {k: z[k] for k in ("sample_id", "caption", "image", "image_pert", "eps", *MATRIX_ARRAYS) if k in z.files}
    n = min(n_samples, len(ex["sample_id"]))
    fig, axes = figures._figure(n, 3, 3.2, 2.4)
    for i in range(n):
        rows = ex["matrix_rows"][i].astype(bool)
        clean = ex["matrix_clean"][i][rows].astype(np.float32)
        pert = ex["matrix_pert"][i][rows].astype(np.float32)
        clean, pert = clean.reshape(len(clean), -1), pert.reshape(len(pert), -1)
        lim = float(max(np.abs(clean).max(), np.abs(pert).max(), 1e-12))
        axes[i, 0].imshow(ex["image"][i])
        axes[i, 0].set_xticks([])
        axes[i, 0].set_yticks([])
        cap = str(ex["caption"][i]) if "caption" in ex else ""
        axes[i, 0].set_ylabel(f"{ex['sample_id'][i]}\n{cap[:30]}", fontsize=6)
        for j, (m, what) in enumerate([(clean, "clean"), (pert, f"ε={float(ex['eps'][i]):g}")], start=1):
            im = axes[i, j].imshow(m, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            axes[i, j].set(xlabel="patch (raster order)", ylabel="caption token")
            axes[i, j].set_title(what, fontsize=8)
        fig.colorbar(im, ax=axes[i, 1:], shrink=0.8)
    fig.suptitle(title, fontsize=9)
    return figures.save(fig, out_dir, name)


def section(r: Report, sens: pd.DataFrame, n_boot: int, seed: int) -> None:
    """Add the matrix figures and the matrix_spearman table to report ``r`` (see module docstring)."""
    if "matrix_spearman" not in sens.columns or not sens["matrix_spearman"].notna().any():
        return
    figdir, tabdir = r.out_dir / "figures", r.out_dir / "tables"
    with_matrix = sens[sens["matrix_spearman"].notna()]
    summary = stats.summarise(with_matrix, ["matrix_spearman"], ["dataset", "model", "perturbation", "eps", "method"],
                              n_boot, seed)
    df = summary.drop(columns=["metric"]).rename(columns={"mean": "matrix_spearman"})
    r.tables.append(Item("Interaction-matrix stability", tables.write(df, tables.markdown(df), tabdir, "matrix_spearman",
                                                                      "matrix_spearman: mean [95% bootstrap CI]"),
                         "Spearman of clean vs perturbed caption-token × patch matrices (real-token rows), mean with "
                         f"95% bootstrap CI ({n_boot} resamples); higher = more stable"))
    for e in example_index(with_matrix):
        setting = (e["method"], e["dataset"], e["model"], e["perturbation"], f"eps{e['eps']:g}")
        paths = matrix_figure(e["path"], figdir, figures.slug("matrix", *setting), " · ".join(map(str, setting)))
        if paths:
            r.figures.append(Item(f"Interaction matrices ({' · '.join(map(str, setting))})", paths,
                                  "caption-token × image-patch matrices of the saved samples, clean and perturbed, "
                                  "raw values on one symmetric scale per sample (red +, blue −)"))
