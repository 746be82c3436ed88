"""Throughput benchmark: images/s per explainer, distance to the device's peak, projected thesis sweep.

``python -m clip_xai.perf.bench`` (``make bench``). Defaults: the tiny model on CPU, ViT-B/16 with
RANDOM weights on CUDA (speed does not depend on the weights). Every explainer is built from
its own yaml. By default the bench is *quick*: the cost knobs (masks, steps) are divided by
:data:`QUICK_DIVISOR`, each row says so (``settings``) and gives the rate scaled linearly back to
the yaml defaults (``images_per_s_at_defaults``); ``--full`` runs the defaults (RISE: 2,000 masks).
Writes ``<out>/bench.csv`` and ``bench.md`` and prints the table.

Honest rows. Each row has the model FLOPs per image counted on a call in exactly the state the
timed calls run in (same batch, same inputs, caches warmed as after the warm-up call;
:mod:`clip_xai.perf.peaks`, backward included), the achieved TFLOP/s and its share of the device's
peak for the precision used (datasheet table on CUDA, a measured matmul on a CPU). A method whose
work depends on captions seen before (a caption cache, found by counting: its FLOPs differ
between seen and unseen captions) gets a ``cold`` row (unique captions every call) and a
``warm`` row. A share above 100% is a counting error and stops the bench after the table is
written (:func:`check_peak_shares`).

Projection of the thesis sweep (5,285 images × 9 methods × 4 ε): per method, one clean map per
image (cached across ε) plus, per ε, one FGSM step and one perturbed map, from the warm rows
(RIVAL10's captions are ten class prompts). It names the method with the largest share, and the
time the same FLOPs would take at the device's peak.

``agreement.{csv,md}``: per method, how far the maps of each lower precision the device runs are
from strict fp32 (mean Spearman between the maps of the same images); the per-method choice for
``precision=auto`` is written from it (:mod:`clip_xai.perf.precision_table`, ``--precision-tables``).
``--baselines`` adds :mod:`clip_xai.perf.baselines` (plain re-implementations timed on the same inputs).
"""
from __future__ import annotations

import argparse
import itertools
import platform
from datetime import date
from pathlib import Path

import pandas as pd
import torch

from clip_xai.config import build, pick_device, precision_scope, resolve_precision
from clip_xai.errors import ClipXaiError
from clip_xai.models.fp8 import fp8_refusal
from clip_xai.perf.peaks import count_flops, device_peak
from clip_xai.perf.timing import median_time

THESIS_METHODS = ["gradcam", "game", "eclip", "selfattn", "rollout", "surgery", "rise", "m2ib", "maskclip"]
THESIS_IMAGES, THESIS_EPS = 5285, 4


#: The large model benched after ViT-B/16 on CUDA (the CLIP inside most diffusion and multimodal systems).
LARGE_ARCH = "ViT-L-14-quickgelu"


# ``--quick`` (the default): the cost knobs (masks, steps) divided by QUICK_DIVISOR, rates scaled back
# linearly to the yaml defaults (cost is linear in each: one forward per mask, one step per step).
QUICK_DIVISOR = {"n_masks": 40, "n_masks_text": 40, "steps": 5}
_caption_ids = itertools.count()  # unique caption suffixes: a "cold" call never repeats a caption


def _inputs(model, batch: int, device: torch.device, unique: bool = False):
    """(pixels, tokens, seeds) of ``batch`` sample images; ``unique``: captions never seen before
    (each gets a fresh suffix), the cold case of a caption cache (Conceptual Captions)."""
    from clip_xai.data import SampleDataset, collate

    ds = SampleDataset(image_size=model.image_size)
    items = [ds[i % len(ds)] for i in range(batch)]
    b, _, _ = collate(items)
    captions = [f"{c} {next(_caption_ids)}" if unique else c for c in b.captions]
    return b.pixels.to(device), model.tokenize(captions), torch.arange(batch)


def _calls(model, fn_factory, px, seeds, tok, cache: str, n: int, device: torch.device):
    """A callable running ``fn_factory``'s call on ``tok`` (warm: the same captions every call) or,
    for ``cache == "cold"``, on fresh captions each call (tokenised here, outside the timing)."""
    if cache != "cold":
        return fn_factory(px, tok, seeds)
    thunks = iter([fn_factory(px, _inputs(model, px.shape[0], device, unique=True)[1], seeds) for _ in range(n)])
    return lambda: next(thunks)()


def flops_per_image(model, fn_factory, batch: int, device: torch.device, precision: str, cache: str,
                    warmed: bool = False) -> float:
    """Model FLOPs per image of one call at ``batch`` with the caches as in the timed calls: ``warm``
    after a call on the same captions (what every timed call after the warm-up sees), ``cold`` on
    captions never seen. ``warmed``: the instance has just been timed on these inputs, so the
    warm-up call is not repeated. Forward and backward, counted on the actual call
    (:mod:`clip_xai.perf.peaks`)."""
    px, tok, seeds = _inputs(model, batch, device)
    with precision_scope(device, precision):
        if not warmed:
            fn_factory(px, tok, seeds)()  # the warm-up: the state every timed call after it runs in
        if cache == "cold":  # ... on captions it has never seen
            tok = _inputs(model, batch, device, unique=True)[1]
        return float(count_flops(fn_factory(px, tok, seeds))) / batch


def differs(a: float, b: float) -> bool:
    """Whether two FLOP counts differ (a cache changed the work), beyond float rounding."""
    return abs(a - b) > 1e-6 * max(abs(a), abs(b), 1.0)


def measure(model, fn_factory, batch: int, device: torch.device, repeats: int, precision: str = "fp32",
            cache: str = "warm") -> tuple[float | None, int, float | None]:
    """Images/s of ``fn_factory(pixels, tokens, seeds)()`` at ``batch``, halving on OOM: median of
    ``repeats`` calls after one warm-up (:func:`clip_xai.perf.timing.median_time`); ``cache`` as in
    :func:`_calls`.

    Returns (rate, batch used, peak device memory in GiB, or None on CPU).
    """
    while batch >= 1:
        try:
            px, tok, seeds = _inputs(model, batch, device)
            call = _calls(model, fn_factory, px, seeds, tok, cache, repeats + 1, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with precision_scope(device, precision):
                sec = median_time(call, device, repeats)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            return batch / sec, batch, peak
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    return None, 0, None


def lower_precisions(device: torch.device) -> list[str]:
    """The precisions other than strict fp32 that ``device`` runs (``reference`` is fp16 on CUDA;
    fp8 where the GPU has FP8 tensor cores)."""
    if device.type != "cuda":
        return ["bf16"]
    return ["tf32", "bf16", "fp16"] + (["fp8"] if fp8_refusal(device) is None else [])


def check_peak_shares(df: pd.DataFrame) -> None:
    """A row above 100% of the device's peak is a counting error (FLOPs of work the timed calls
    did not do, or a wrong peak): one clear error naming the rows."""
    if "peak_share_pct" not in df.columns:
        return
    bad = df[df.peak_share_pct.astype(float) > 100.0]
    if len(bad):
        rows = "; ".join(f"{r.explainer} batch {r.batch} ({r.cache}): {r.peak_share_pct:.0f}%" for r in bad.itertuples())
        raise ClipXaiError(f"bench rows above 100% of the device's peak: {rows}",
                           "the FLOP count includes work the timed calls did not do (or the peak is wrong): "
                           "count over the timed calls with the caches in the same state")


def quick_overrides(cfg, group: str = "explainer", divisor: dict[str, int] = QUICK_DIVISOR) -> tuple[list[str], float, str]:
    """(overrides, rate scale to the yaml defaults, label) for ``cfg[group]`` in quick mode: each
    cost knob it has divided by its divisor; the rate at the defaults is the measured rate times
    the product of (quick value / default value)."""
    over, scale, parts = [], 1.0, []
    node = cfg[group]
    for knob, div in divisor.items():
        if knob in node and isinstance(node[knob], int) and int(node[knob]) > 1:
            if knob == "n_masks_text" and node.get("modality", "image") != "text":
                continue
            default = int(node[knob])
            quick = max(1, default // div)
            over.append(f"{group}.{knob}={quick}")
            scale *= quick / default
            parts.append(f"{knob}={quick} of {default}")
    return over, scale, ", ".join(parts)


def precision_agreement(model, explainers: dict, device: torch.device, samples: int) -> pd.DataFrame:
    """Per method and lower precision: Spearman between its maps and the fp32 maps of the same
    ``samples`` images (min-max normalised at image size, as the studies compare them)."""
    from clip_xai.explainers.postprocess import image_maps
    from clip_xai.metrics.sensitivity import spearman

    px, tok, seeds = _inputs(model, samples, device)
    size = tuple(px.shape[-2:])
    rows = []
    for name, explainer in explainers.items():
        maps = {}
        for prec in ["fp32", *lower_precisions(device)]:
            with precision_scope(device, prec):
                maps[prec] = image_maps(explainer(model, px, tok, seeds).float(), size)
        for prec in lower_precisions(device):
            rho = spearman(maps["fp32"], maps[prec])
            finite = rho[torch.isfinite(rho)]
            rows.append({"explainer": name, "precision": prec, "samples": samples,
                         "mean_spearman": finite.mean().item() if len(finite) else float("nan"),
                         "min_spearman": finite.min().item() if len(finite) else float("nan"),
                         "nan_pairs": int((~torch.isfinite(rho)).sum())})
            print(f"  {name:<20} {prec} vs fp32: mean Spearman {rows[-1]['mean_spearman']:.4f}", flush=True)
    return pd.DataFrame(rows)


def projection(best: pd.Series, flops: pd.Series | None, peak_tflops: float | None, methods: list[str]) -> str:
    """The thesis sweep's projected wall time on this device, its largest share, and the time at peak."""
    counts = {m: THESIS_IMAGES * (1 + THESIS_EPS) for m in methods}  # clean (cached) + one map per ε
    per = {m: counts[m] / best[m] + THESIS_IMAGES * THESIS_EPS / best["fgsm (perturbation)"] for m in methods}
    sec, top = sum(per.values()), max(per, key=per.get)
    text = (f"Projected thesis sweep ({THESIS_IMAGES} images x {len(methods)} methods x {THESIS_EPS} eps, "
            f"clean maps cached, best batch per method): {sec / 3600:.2f} h on this device, "
            f"{100 * per[top] / sec:.0f}% of it {top}.")
    if flops is not None and peak_tflops and flops.notna().all():
        total = sum(counts[m] * flops[m] + THESIS_IMAGES * THESIS_EPS * flops["fgsm (perturbation)"] for m in methods)
        text += (f" Its {total / 1e18:.3f} EFLOP would take {total / (peak_tflops * 1e12) / 3600:.2f} h "
                 f"at the device's peak ({100 * total / (sec * peak_tflops * 1e12):.0f}% "
                 f"of peak overall).")
    return text


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from clip_xai.paths import CONF_DIR
    from clip_xai.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


def _explainer_cfg(overrides: list[str], name: str, per_explainer: list[str]):
    """Config for explainer ``name``; ``explainer.KEY=VALUE`` overrides apply where it has KEY."""
    from clip_xai.config import methods_having
    from clip_xai.paths import CONF_DIR

    base = overrides + [f"explainer={name}"]
    key = lambda o: o.split("=", 1)[0].lstrip("+~").split(".")[1]  # noqa: E731  explainer.KEY[.sub]=VALUE -> KEY
    own = [o for o in per_explainer if methods_having(CONF_DIR, key(o), [name])]  # the rule method_settings follows
    return compose(base + own)


def run_bench(model_name: str | None, device_spec: str, batch_sizes: list[int], explainers: list[str],
              repeats: int, out: Path, random_weights: bool = True, precision: str = "fp32",
              extra: list[str] | None = None, flops: bool = True, agreement: int = 4,
              baselines: bool = False, perturbations: tuple[str, ...] = ("pgd", "map_attack"),
              quick: bool = False, tables: Path | None = None,
              quick_divisor: dict[str, int] | None = None) -> pd.DataFrame:
    """Measure every explainer (and the FGSM step) at each batch size; write bench.csv/bench.md.

    ``extra`` are Hydra overrides for every config; ``explainer.KEY=VALUE`` applies to the explainers
    that have KEY (e.g. ``explainer.chunk=500`` only to RISE). ``flops``: count model FLOPs over
    the timed calls and report the share of the device's peak (a row above 100% is an error).
    ``agreement``: images for the precision-agreement table (0 = skip); ``tables``: where its
    per-method choice for ``precision=auto`` is written (:mod:`clip_xai.perf.precision_table`).
    ``baselines``: also time the plain re-implementations (:mod:`clip_xai.perf.baselines`).
    ``perturbations``: the perturbations timed beside the FGSM step (their config defaults; the
    map attack targets Grad-CAM's map). ``quick``: masks and steps divided by
    :data:`QUICK_DIVISOR` (or ``quick_divisor``), rates also given scaled back to the defaults
    (``images_per_s_at_defaults``).

    A method whose work depends on captions seen before (a caption cache) gets two rows per batch:
    ``cold`` (every call on captions never seen, as Conceptual Captions' unique captions) and
    ``warm`` (the same captions again, as a dataset of class prompts); others one row (``-``).
    """
    device = pick_device(device_spec)
    precision = resolve_precision(device, precision, announce=True)
    model_name = model_name or ("vit_b16" if device.type == "cuda" else "tiny")
    extra = list(extra or [])
    per_explainer = [o for o in extra if o.lstrip("+~").startswith("explainer.")]
    overrides = [f"model={model_name}", *(o for o in extra if o not in per_explainer)]
    if random_weights and model_name != "tiny":
        overrides.append("model.pretrained=null" if model_name != "altclip" else "model.pretrained=false")
    cfg = compose(overrides)
    model = build(cfg, "model").to(device)
    peak_source, peak = device_peak(device, precision) if flops else (None, None)
    rows = []
    divisor = quick_divisor or QUICK_DIVISOR

    def perturbation_cfg(name: str):
        pcfg = compose(overrides + [f"perturbation={name}"])
        over, scale, label = quick_overrides(pcfg, "perturbation", divisor) if quick else ([], 1.0, "")
        return (compose(overrides + [f"perturbation={name}", *over]) if over else pcfg), scale, label

    jobs = []  # (row label, timed callable, eager twin for FLOPs, is a perturbation, rate scale, settings)
    for name in ("fgsm", *perturbations):
        pcfg, scale, label = perturbation_cfg(name)
        pert = build(pcfg, "perturbation")
        row = f"{name} (perturbation)"
        if name == "map_attack":
            pert.bind(build(_explainer_cfg(overrides, "gradcam", per_explainer), "explainer"), model)
            row = "map_attack (perturbation, gradcam)"
        jobs.append((row, pert, pert, True, scale, label))
    for name in explainers:  # FLOPs are counted eagerly: a second instance where compilation is on
        ecfg = _explainer_cfg(overrides, name, per_explainer)
        over, scale, label = quick_overrides(ecfg, "explainer", divisor) if quick else ([], 1.0, "")
        fn = build(_explainer_cfg(overrides, name, per_explainer + over), "explainer")
        compiled = ecfg.explainer.get("compile", False) in (True, "auto")
        eager = build(_explainer_cfg(overrides, name, per_explainer + over + ["explainer.compile=false"]), "explainer") \
            if compiled else fn
        jobs.append((name, fn, eager, False, scale, label))
    for name, fn, eager, is_step, scale, label in jobs:
        make = (lambda f: (lambda px, tok, s: (lambda: f(model, px, tok)))) if is_step else \
               (lambda f: (lambda px, tok, s: (lambda: f(model, px, tok, s))))
        dependent = None  # a caption cache? decided by counting at the first batch size
        for bs in batch_sizes:
            rate, used, mem = measure(model, make(fn), bs, device, repeats, precision, cache="warm")
            counted = {}
            if rate:
                counted["warm"] = flops_per_image(model, make(eager), used, device, precision, "warm",
                                                  warmed=eager is fn)
                if dependent is None or dependent:
                    counted["cold"] = flops_per_image(model, make(eager), used, device, precision, "cold", warmed=True)
                    dependent = differs(counted["cold"], counted["warm"])
            measured = {"warm": (rate, used, mem)}
            if dependent:
                measured["cold"] = measure(model, make(fn), used, device, repeats, precision, cache="cold")
            for state in (["cold", "warm"] if dependent else ["warm"]):
                rate, used, mem = measured[state]
                row = {"explainer": name, "cache": state if dependent else "-", "batch": used,
                       "settings": label or "defaults", "images_per_s": rate,
                       "images_per_s_at_defaults": rate * scale if rate else None, "peak_gib": mem}
                if flops:
                    gflop = counted[state] / 1e9 if rate and state in counted else None
                    achieved = gflop * rate / 1e3 if gflop and rate else None
                    row.update(gflop_per_image=gflop, tflops_per_s=achieved,
                               peak_share_pct=100 * achieved / peak if achieved and peak else None)
                rows.append(row)
                print(f"  {name:<20} {row['cache']:>4} batch {used:>3}: "
                      + (f"{rate:9.2f} images/s" if rate else "out of memory")
                      + (f", {row['gflop_per_image']:.3f} GFLOP/image, {row['tflops_per_s']:.4f} TFLOP/s"
                         if flops and row.get("gflop_per_image") else ""), flush=True)
    if flops and device.type != "cuda" and peak:  # a CPU's peak is measured: take the better of two
        peak_source, later = device_peak(device, precision)  # (load changes while the bench runs)
        if later and later > peak:
            for row in rows:
                if row.get("tflops_per_s"):
                    row["peak_share_pct"] = 100 * row["tflops_per_s"] / later
            peak = later
        peak_source += ", best of a measurement before and one after the rows"
    df = pd.DataFrame(rows)
    df.insert(0, "device", torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)")
    df.insert(1, "model", str(cfg.model.name) + (" (random weights)" if random_weights else ""))
    df.insert(2, "precision", precision)
    if device.type != "cuda":
        df = df.drop(columns="peak_gib")
    if not quick:
        df = df.drop(columns=["settings", "images_per_s_at_defaults"])
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "bench.csv", index=False)
    rate_col = "images_per_s_at_defaults" if quick else "images_per_s"
    # the thesis sweep (RIVAL10: ten class prompts) sees warm caption caches
    best = df[df.cache != "cold"].groupby("explainer")[rate_col].max()
    title = f"# clip_xai benchmark ({date.today()}, {platform.node()})"
    lines = [title, ""]
    if quick:
        lines += [f"Quick bench (the default; `--full` runs the yaml defaults): masks and steps divided by "
                  f"{divisor} (column `settings`); `images_per_s_at_defaults` scales the measured rate "
                  "linearly back to the defaults. FLOPs and peak shares are of the calls measured.", ""]
    lines += [df.to_markdown(index=False, floatfmt=".3g"), ""]
    if flops:
        lines += [f"Peak: {peak:.3g} TFLOP/s ({peak_source})." if peak else f"Peak: unknown ({peak_source}).", ""]
    if set(THESIS_METHODS) <= set(best.index) and "fgsm (perturbation)" in best.index:
        gflops = None
        if flops:
            warm = df[df.cache != "cold"]
            gflops = warm.groupby("explainer")["gflop_per_image"].first() * 1e9
            if quick:  # FLOPs at the defaults: the measured ones over the rate scale
                scales = {name: scale for name, _, _, _, scale, _ in jobs}
                gflops = gflops / pd.Series(scales).reindex(gflops.index).fillna(1.0)
        lines.append(projection(best, gflops, peak, THESIS_METHODS))
    if agreement > 0:
        agree = precision_agreement(model, {name: fn for name, fn, _, is_step, _, _ in jobs if not is_step}, device, agreement)
        agree.to_csv(out / "agreement.csv", index=False)
        lines += ["", f"## Maps in lower precision against strict fp32 ({agreement} images, mean Spearman)", "",
                  agree.to_markdown(index=False, floatfmt=".4f")]
        if tables is not None:
            from clip_xai.perf import precision_table

            path = precision_table.write(tables, str(cfg.model.name), device, agree)
            lines += ["", f"precision=auto table (cheapest precision at mean Spearman >= "
                          f"{precision_table.THRESHOLD}): {path}"]
    if baselines:
        from clip_xai.perf.baselines import run_baselines

        lines += ["", run_baselines(device, repeats)]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    check_peak_shares(df)
    return df


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="clip-xai-bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model config name (default: tiny on CPU, vit_b16 on CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--explainers", nargs="+", default=None, help="default: every conf/explainer/*.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pretrained", action="store_true", help="load the model's real weights instead of random ones")
    p.add_argument("--precision", default="fp32", help="fp32 | tf32 | bf16 | fp16 | reference (as the precision= config key)")
    p.add_argument("--set", dest="extra", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra Hydra overrides for every config, e.g. explainer.chunk=500")
    p.add_argument("--out", type=Path, default=Path("outputs/bench"))
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip FLOP counting and the peak share")
    p.add_argument("--agreement", type=int, default=4, metavar="N",
                   help="images for the lower-precision vs fp32 map agreement table (0 = skip)")
    p.add_argument("--no-large", dest="large", action="store_false",
                   help=f"on CUDA without --model, skip the second table for {LARGE_ARCH} (random weights)")
    p.add_argument("--perturbations", nargs="*", default=["pgd", "map_attack"],
                   help="perturbations timed beside the FGSM step (default: pgd map_attack)")
    p.add_argument("--full", dest="quick", action="store_false",
                   help="the yaml defaults for every row (RISE 2,000 masks, rise_nib 6,000, 10 steps); the default "
                        f"is the quick bench: masks and steps divided by {QUICK_DIVISOR}, rates scaled back and labelled")
    p.add_argument("--precision-tables", type=Path, default=Path("outputs") / "precision",
                   help="where the agreement run writes the per-method table precision=auto reads "
                        "(a run reads <output_root>/precision)")
    p.add_argument("--baselines", action="store_true",
                   help="also time RISE on ViT-B/16 and the sensitivity metrics against plain re-implementations")
    a = p.parse_args(argv)
    from clip_xai.paths import CONF_DIR

    names = a.explainers or sorted(f.stem for f in (Path(CONF_DIR) / "explainer").glob("*.yaml"))
    runs = [(a.model, a.extra, a.out)]
    if a.model is None and a.large and pick_device(a.device).type == "cuda":  # the ViT-L/14 row(s) on CUDA
        runs.append(("open_clip", [*a.extra, f"model.arch={LARGE_ARCH}"], a.out / "vit_l14"))
    try:
        for model_name, extra, out in runs:
            run_bench(model_name, a.device, a.batch_sizes, names, a.repeats, out, random_weights=not a.pretrained,
                      precision=a.precision, extra=extra, flops=a.flops, agreement=a.agreement,
                      baselines=a.baselines, perturbations=tuple(a.perturbations), quick=a.quick,
                      tables=a.precision_tables)
    except ClipXaiError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
