"""Throughput benchmark: images/s per explainer, distance to the device's peak, projected thesis sweep.

``python -m clip_xai.bench`` (``make bench``). Defaults: the tiny model on CPU, ViT-B/16 with
RANDOM weights on CUDA (speed does not depend on the weights). Every explainer is built from
its own yaml, so the measured settings are the defaults a sweep uses (RISE: 2,000 masks).
Writes ``<out>/bench.csv`` and ``bench.md`` and prints the table.

Each row also has the model FLOPs per image (counted on one real call at batch 1, backward
included; :mod:`clip_xai.peaks`), the achieved TFLOP/s and its share of the device's peak for the
precision used (datasheet table on CUDA, a measured matmul on a CPU).

Projection of the thesis sweep (5,285 images × 9 methods × 4 ε): per method, one clean map per
image (cached across ε) plus, per ε, one FGSM step and one perturbed map. It names the method
with the largest share, and the time the same FLOPs would take at the device's peak.

``agreement.{csv,md}``: per method, how far the maps of each lower precision the device runs are
from strict fp32 (mean Spearman between the maps of the same images). ``--baselines`` adds
:mod:`clip_xai.baselines` (plain re-implementations timed on the same inputs).
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import pandas as pd
import torch

from clip_xai.config import build, pick_device, precision_scope, resolve_precision
from clip_xai.errors import ClipXaiError
from clip_xai.peaks import count_flops, device_peak

THESIS_METHODS = ["gradcam", "game", "eclip", "selfattn", "rollout", "surgery", "rise", "m2ib", "maskclip"]
THESIS_IMAGES, THESIS_EPS = 5285, 4


#: The large model benched after ViT-B/16 on CUDA (the CLIP inside most diffusion and multimodal systems).
LARGE_ARCH = "ViT-L-14-quickgelu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int, slow: float = 2.0) -> float:
    """Seconds per call: median of ``repeats`` after one warm-up; a warm-up slower than ``slow``
    seconds is itself the measurement (one-off start-up costs are then negligible)."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t
    if first > slow:
        return first
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _inputs(model, batch: int, device: torch.device):
    from clip_xai.data import SampleDataset, collate

    ds = SampleDataset(image_size=model.image_size)
    items = [ds[i % len(ds)] for i in range(batch)]
    b, _, _ = collate(items)
    return b.pixels.to(device), model.tokenize(b.captions), torch.arange(batch)


def measure(model, fn_factory, batch: int, device: torch.device, repeats: int,
            precision: str = "fp32") -> tuple[float | None, int, float | None]:
    """Images/s of ``fn_factory(pixels, tokens, seeds)`` at ``batch``, halving on OOM.

    Returns (rate, batch used, peak device memory in GiB, or None on CPU).
    """
    while batch >= 1:
        try:
            px, tok, seeds = _inputs(model, batch, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with precision_scope(device, precision):
                sec = _time(fn_factory(px, tok, seeds), device, repeats)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            return batch / sec, batch, peak
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    return None, 0, None


def flops_per_image(model, fn_factory, device: torch.device, precision: str) -> float:
    """Model FLOPs of one call at batch 1 (forward and backward), counted on the actual call."""
    px, tok, seeds = _inputs(model, 1, device)
    with precision_scope(device, precision):
        return float(count_flops(fn_factory(px, tok, seeds)))


def lower_precisions(device: torch.device) -> list[str]:
    """The precisions other than strict fp32 that ``device`` runs (``reference`` is fp16 on CUDA)."""
    return ["tf32", "bf16", "fp16"] if device.type == "cuda" else ["bf16"]


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
    from omegaconf import OmegaConf

    base = overrides + [f"explainer={name}"]
    plain = compose(base)
    own = [o for o in per_explainer if OmegaConf.select(plain, o.split("=", 1)[0].lstrip("+~")) is not None]
    return compose(base + own) if own else plain


def run_bench(model_name: str | None, device_spec: str, batch_sizes: list[int], explainers: list[str],
              repeats: int, out: Path, random_weights: bool = True, precision: str = "fp32",
              extra: list[str] | None = None, flops: bool = True, agreement: int = 4,
              baselines: bool = False, perturbations: tuple[str, ...] = ("pgd", "map_attack")) -> pd.DataFrame:
    """Measure every explainer (and the FGSM step) at each batch size; write bench.csv/bench.md.

    ``extra`` are Hydra overrides for every config; ``explainer.KEY=VALUE`` applies to the explainers
    that have KEY (e.g. ``explainer.chunk=500`` only to RISE). ``flops``: count model FLOPs and
    report the share of the device's peak. ``agreement``: images for the precision-agreement table
    (0 = skip). ``baselines``: also time the plain re-implementations (:mod:`clip_xai.baselines`).
    ``perturbations``: the perturbations timed beside the FGSM step (their config defaults; the
    map attack targets Grad-CAM's map).
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
    step = build(compose(overrides + ["perturbation=fgsm"]), "perturbation")
    jobs = [("fgsm (perturbation)", step, step, True)]
    for name in perturbations:
        pert = build(compose(overrides + [f"perturbation={name}"]), "perturbation")
        label = f"{name} (perturbation)"
        if name == "map_attack":
            pert.bind(build(_explainer_cfg(overrides, "gradcam", per_explainer), "explainer"), model)
            label = "map_attack (perturbation, gradcam)"
        jobs.append((label, pert, pert, True))
    for name in explainers:  # FLOPs are counted eagerly: a second instance with compilation off
        fn = build(_explainer_cfg(overrides, name, per_explainer), "explainer")
        eager = build(_explainer_cfg(overrides, name, per_explainer + ["explainer.compile=false"]), "explainer") \
            if flops else fn
        jobs.append((name, fn, eager, False))
    for name, fn, eager, is_step in jobs:
        make = (lambda f: (lambda px, tok, s: (lambda: f(model, px, tok)))) if is_step else \
               (lambda f: (lambda px, tok, s: (lambda: f(model, px, tok, s))))
        gflop = flops_per_image(model, make(eager), device, precision) / 1e9 if flops else None
        for bs in batch_sizes:
            rate, used, mem = measure(model, make(fn), bs, device, repeats, precision)
            row = {"explainer": name, "batch": used, "images_per_s": rate, "peak_gib": mem}
            if flops:
                achieved = gflop * rate / 1e3 if rate else None
                row.update(gflop_per_image=gflop, tflops_per_s=achieved,
                           peak_share_pct=100 * achieved / peak if achieved and peak else None)
            rows.append(row)
            print(f"  {name:<20} batch {used:>3}: " + (f"{rate:9.2f} images/s" if rate else "out of memory")
                  + (f", {gflop:.2f} GFLOP/image, {row['tflops_per_s']:.3f} TFLOP/s" if flops and rate else ""), flush=True)
    df = pd.DataFrame(rows)
    df.insert(0, "device", torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)")
    df.insert(1, "model", str(cfg.model.name) + (" (random weights)" if random_weights else ""))
    df.insert(2, "precision", precision)
    if device.type != "cuda":
        df = df.drop(columns="peak_gib")
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "bench.csv", index=False)
    best = df.groupby("explainer")["images_per_s"].max()
    lines = [f"# clip_xai benchmark ({date.today()}, {platform.node()})", "", df.to_markdown(index=False, floatfmt=".3g"), ""]
    if flops:
        lines += [f"Peak: {peak:.3g} TFLOP/s ({peak_source})." if peak else f"Peak: unknown ({peak_source}).", ""]
    if set(THESIS_METHODS) <= set(best.index) and "fgsm (perturbation)" in best.index:
        gflops = df.groupby("explainer")["gflop_per_image"].first() * 1e9 if flops else None
        lines.append(projection(best, gflops, peak, THESIS_METHODS))
    if agreement > 0:
        agree = precision_agreement(model, {name: fn for name, fn, _, is_step in jobs if not is_step}, device, agreement)
        agree.to_csv(out / "agreement.csv", index=False)
        lines += ["", f"## Maps in lower precision against strict fp32 ({agreement} images, mean Spearman)", "",
                  agree.to_markdown(index=False, floatfmt=".4f")]
    if baselines:
        from clip_xai.baselines import run_baselines

        lines += ["", run_baselines(device, repeats)]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
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
                      baselines=a.baselines, perturbations=tuple(a.perturbations))
    except ClipXaiError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
