"""Every report figure at 18 methods: no legend over any axes (or its title) and none cut off at the
figure's edge, checked on matplotlib's bounding boxes after a draw; one colour per method across
figures; the palette's families."""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from clip_xai.report import bands, controls, curves, figures, localisation, overview, palette, randomisation
from clip_xai.report.palette import FAMILIES

METHODS = ["saliency", "fastig", "mfaba", "gradcam", "eclip", "legrad", "selfattn", "rollout", "chefer", "game",
           "attnlrp", "maskclip", "surgery", "gem", "rise", "m2ib", "abm[target_layer=8, steps=10]", "interactions"]
assert len(METHODS) == 18


PAL = palette.palette([*METHODS, "zzz_unknown"])  # a report's palette covers every method of the report


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> tuple[list[str], list[Figure]]:
    """Every figure drawn once at 18 methods, captured instead of written (the checks need the
    Figure, not the files)."""
    out: list[Figure] = []

    def save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
        fig.canvas.draw()
        out.append(fig)
        return [Path(out_dir) / f"{name}.png", Path(out_dir) / f"{name}.pdf"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(figures, "save", save)
        names = every_figure(tmp_path_factory.mktemp("figures"), PAL)
    return names, out


def legend_problems(fig: Figure) -> list[str]:
    """Every legend that overlaps an axes or an axes title, or sticks out of the figure."""
    r = fig.canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    problems = []
    for leg in legends:
        lb = leg.get_window_extent(r)
        if not (fig.bbox.x0 - 1 <= lb.x0 and lb.x1 <= fig.bbox.x1 + 1 and fig.bbox.y0 - 1 <= lb.y0
                and lb.y1 <= fig.bbox.y1 + 1):
            problems.append(f"legend {lb} outside the figure {fig.bbox}")
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            if lb.overlaps(ax.get_window_extent(r)):
                problems.append(f"legend over axes {ax.get_title()!r}")
            if ax.get_title() and lb.overlaps(ax.title.get_window_extent(r)):
                problems.append(f"legend over the title {ax.get_title()!r}")
    return problems


def band_summary(extra: dict, metrics: list[str], x: str, xs: list[float]) -> pd.DataFrame:
    rows = []
    for k, m in enumerate(METHODS):
        for metric in metrics:
            for v in xs:
                mean = 1 - 0.03 * k - 0.5 * v
                rows.append({**extra, "method": m, "metric": metric, x: v, "n": 10, "mean": mean,
                             "lo": mean - 0.05, "hi": mean + 0.05})
    return pd.DataFrame(rows)


def sens_rows(n: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    parts = []
    for m in METHODS:
        for pert, target in (("fgsm", "clip_xai.perturbations.fgsm.FGSM"), ("noise_sign", controls.CONTROL_TARGET)):
            for eps in (0.01, 0.03):
                parts.append(pd.DataFrame({"dataset": "coco", "model": "ViT-B-16", "method": m, "perturbation": pert,
                                           "eps": eps, "sample_id": [f"s{i}" for i in range(n)],
                                           "spearman": rng.random(n), "ssim": np.nan, "topk": np.nan,
                                           "sim_diff": rng.normal(0, 0.1, n), "cfg.perturbation._target_": target}))
    return pd.concat(parts, ignore_index=True)


def every_figure(tmp: Path, pal: dict | None = None) -> list[str]:
    """Draw every report figure that shows methods, at 18 methods; return their names in order."""
    names = []
    s = band_summary({"dataset": "coco", "model": "ViT-B-16", "perturbation": "fgsm"}, ["spearman", "ssim", "topk"],
                     "eps", [0.01, 0.03, 0.1])
    bands.sensitivity_curves(s, tmp, pal=pal)
    names.append("sensitivity_vs_eps")
    loc = band_summary({"dataset": "rival10", "model": "tiny", "mask": "entire_object"}, ["pointing_game", "mask_auroc"],
                       "eps", [0.0, 0.03])
    localisation.curves(loc, tmp, pal=pal)
    names.append("localisation_vs_eps")
    rnd = band_summary({"dataset": "coco", "model": "tiny", "tower": "image", "mode": "cascading"}, ["rand_spearman"],
                       "x", [0, 1, 2])
    rnd["state"] = rnd["x"].map({0: "none", 1: "head", 2: "b1"})
    randomisation.figure(rnd, tmp, pal=pal)
    names.append("randomisation")
    cur = band_summary({"dataset": "imagenet", "model": "tiny", "study": "perturbation_curve", "target": "gt"},
                       ["hit"], "fraction", [0.0, 0.5, 0.9])
    cur = pd.concat([cur.assign(curve_variant="positive"), cur.assign(curve_variant="negative")], ignore_index=True)
    curves.figure(cur.rename(columns={"metric": "score"}), tmp, "curves", pal=pal)
    names.append("curves")
    sens = sens_rows()
    figures.metric_vs_simdiff(sens, "spearman", tmp)
    names.append("spearman_vs_simdiff")
    controls.controls_curves(sens, tmp, n_boot=10, seed=0, name="controls_vs_eps")
    names.append("controls_vs_eps")
    cols = [overview.Column(f"study{k} · metric", f"cat{k}", f"study{k}", "spearman", True,
                            pd.DataFrame({"method": METHODS * 2, "sample_id": ["a"] * 18 + ["b"] * 18,
                                          "spearman": np.r_[np.arange(18.0), np.arange(18.0)[::-1] + k]}))
            for k in range(3)]
    t = pd.concat([overview.rank_column(c, n_boot=10)[0].assign(column=c.label, category=c.category,
                                                                 higher_is_better=True, n_ranked=18, sample_set="all")
                   for c in cols], ignore_index=True)
    mr = t.groupby("method")["rank"].mean().rename("mean").reset_index()
    t = pd.concat([t, mr.assign(column="mean rank", category="mean rank", higher_is_better=False, n=3, n_ranked=3,
                                sample_set="all", rank=np.nan)], ignore_index=True)
    overview.figure(t, tmp, "overview", "Overview · coco · tiny")
    names.append("overview")
    return names


def test_no_legend_overlaps_an_axes_at_18_methods(drawn) -> None:
    names, drawn = drawn
    assert len(drawn) == len(names)
    for name, fig in zip(names, drawn):
        assert legend_problems(fig) == [], name
    with_legend = [n for n, f in zip(names, drawn) if f.legends]
    assert set(with_legend) >= {"sensitivity_vs_eps", "localisation_vs_eps", "randomisation", "curves",
                                "spearman_vs_simdiff", "controls_vs_eps"}
    sens = drawn[0].legends[0]
    assert [t.get_text() for t in sens.get_texts()] == palette.ordered(METHODS)  # all 18, by family


def test_the_check_catches_a_legend_inside_the_panels(tmp_path: Path) -> None:
    """The placement the report had before: a legend of 18 methods in the last panel."""
    fig, axes = figures._figure(1, 3, 4.0, 3.2)
    for ax in axes.flat:
        for k, m in enumerate(METHODS):
            ax.plot([0, 1], [k, k + 1], label=m)
        ax.set_title("coco · ViT-B-16")
    axes[0, -1].legend(fontsize=7, loc="best", title="method (95% CI)", title_fontsize=7)
    fig.canvas.draw()
    assert any("legend over axes" in p for p in legend_problems(fig))


def test_one_colour_per_method_across_figures(drawn) -> None:
    pal = PAL
    seen: dict[str, set] = {}
    for fig in drawn[1][:4]:  # the band figures draw one line per method
        for ax in fig.axes:
            for line in ax.get_lines():
                if not line.get_label().startswith("_"):
                    seen.setdefault(line.get_label(), set()).add(tuple(np.round(line.get_color(), 6)))
    assert set(seen) == set(METHODS)
    for m, colours in seen.items():
        assert colours == {tuple(np.round(pal[m], 6))}, m


def test_palette_families_sit_in_neighbouring_hues() -> None:
    names = [n for ns in FAMILIES.values() for n in ns]
    pal = palette.palette(names)
    assert len({tuple(np.round(c, 4)) for c in pal.values()}) == len(names)  # all distinct
    assert palette.palette(names[::-1]) == pal  # keyed by the method, not by the order it arrives in
    hue = {m: colorsys.rgb_to_hls(*pal[m])[0] for m in names}
    order = sorted(names, key=lambda m: (hue[m] - hue[palette.ordered(names)[0]]) % 1.0)
    fams = [palette.family(m) for m in order]
    assert [f for i, f in enumerate(fams) if i == 0 or f != fams[i - 1]] == list(FAMILIES)  # one stretch each
    assert palette.family("model | abm[target_layer=8]") == "perturbation" and palette.family("new_method") == "other"
