"""Report section of the randomisation sanity check: similarity to the original map against the
randomised unit (output head, blocks top down, stem), one curve per method (the layout of Adebayo et al. 2018, Fig. 2), and a table."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from clip_xai.report import stats, tables
from clip_xai.report.contents import Item, Report
from clip_xai.report.bands import band_grid

METRICS = {"rand_spearman": "Spearman ρ", "rand_ssim": "SSIM", "rand_topk": "Top-K intersection"}
SETTING = ["dataset", "model", "tower"]


def states(rnd: pd.DataFrame) -> pd.DataFrame:
    """Rows with a ``mode``, an x position and a ``state`` label: x = 0 for nothing randomised, then
    1, 2, ... for the units from the output down (head, blocks top first, stem: the ``block``
    column orders them, see schema.py). The "none" rows start the curve of every mode, so they are
    repeated per mode. Rows written before the ``unit`` column are labelled from ``block``."""
    modes = sorted(set(rnd["randomisation"]) - {"none"}) or ["none"]
    none = rnd[rnd["randomisation"] == "none"]
    rest = rnd[rnd["randomisation"] != "none"]
    out = pd.concat([*(none.assign(mode=m) for m in modes), rest.assign(mode=rest["randomisation"])], ignore_index=True)
    randomised = out["randomisation"] != "none"
    depth = out["block"].where(randomised).groupby([out[c] for c in SETTING], dropna=False).rank(method="dense",
                                                                                                  ascending=False)
    out["x"] = depth.fillna(0).astype(int)
    unit = out["unit"].astype(str) if "unit" in out.columns else pd.Series("", index=out.index)
    from_block = out["block"].map(lambda b: f"b{int(b)}")
    out["state"] = unit.where(unit != "", from_block).where(randomised, "none")
    return out


def summary(rnd: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Mean and CI of each similarity per setting × mode × state × method."""
    d = states(rnd)
    metrics = [m for m in METRICS if m in d.columns and d[m].notna().any()]
    return stats.summarise(d, metrics, [*SETTING, "mode", "x", "state", "method"], n_boot, seed)


def figure(s: pd.DataFrame, out_dir: Path, name: str = "randomisation", pal: dict | None = None) -> list[Path]:
    """Rows = setting × mode, columns = similarity measures; x = randomised unit (output down)."""

    def label(ax, key, metric, d):
        ticks = d.drop_duplicates("x").sort_values("x")
        ax.set_xticks(ticks["x"], ticks["state"], rotation=90, fontsize=7)
        ax.set_ylim(min(-0.05, float(d["mean"].min()) - 0.05), 1.05)
        ax.axhline(0, color="0.6", linewidth=0.8)
        ax.set_title(f"{METRICS[metric]} · {key[-1]}\n{' · '.join(map(str, key[:-1]))}", fontsize=9)
        ax.set_xlabel("randomised unit (output → input)" if key[-1] == "cascading" else "randomised unit")

    metrics = [m for m in METRICS if m in set(s["metric"])]
    return band_grid(s, [*SETTING, "mode"], metrics, "x", out_dir, name, label, width=4.2, pal=pal)


def table(s: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Spearman mean [CI] per setting × mode × method (rows) and randomised state (columns)."""
    d = s[s["metric"] == "rand_spearman"].copy() if "rand_spearman" in set(s["metric"]) else s.copy()
    d["cell"] = tables.ci_cells(d["mean"], d["lo"], d["hi"])
    d = d.sort_values("x")
    wide = d.pivot_table(index=[*SETTING, "mode", "method"], columns="state", values="cell", aggfunc="first", sort=False)
    wide = wide[list(dict.fromkeys(d["state"]))]
    wide.columns.name = None
    note = ("Spearman ρ between the original map and the map after randomising the unit named in the column "
            "header (head = final norm and projection, b<i> = block i, stem = patch/token, class and position "
            "embeddings and the norm before block 0; cascading: that unit and every unit nearer the output; "
            "independent: that unit alone). "
            "1 = unchanged; a method that explains the model falls towards 0.\n\n")
    return s, note + tables.markdown(wide, index=True)


def section(r: Report, rnd: pd.DataFrame, n_boot: int, seed: int) -> None:
    """Add the randomisation figure and table to report ``r``."""
    s = summary(rnd, n_boot, seed)
    if s["mean"].notna().sum() == 0:
        r.skipped.append("randomisation figure: every randomisation row is NaN (see map_flag counts)")
        return
    r.figures.append(Item("Model randomisation", figure(s, r.out_dir / "figures", pal=r.palette),
                          "similarity between the original map and the map of the model with randomised units "
                          "(output head, blocks, stem), against the randomised unit, one curve per method, shaded 95% bootstrap CI "
                          "(Adebayo et al. 2018: passing methods fall towards 0)"))
    df, md = table(s)
    r.tables.append(Item("Model randomisation", tables.write(df, md, r.out_dir / "tables", "randomisation",
                                                             "Model randomisation: Spearman ρ to the original map"),
                         "mean [95% CI] similarity per method and randomised state; the CSV has every measure"))
