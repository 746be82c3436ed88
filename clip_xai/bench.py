"""Throughput benchmark: images/s per explainer at batch 1 and 16, and the projected thesis sweep.

``python -m clip_xai.bench`` (``make bench``). Defaults: the tiny model on CPU, ViT-B/16 with
RANDOM weights on CUDA (speed does not depend on the weights). Every explainer is built from
its own yaml, so the measured settings are the defaults a sweep uses (RISE: 2,000 masks).
Writes ``<out>/bench.csv`` and ``bench.md`` and prints the table.

Projection of the thesis sweep (5,285 images × 9 methods × 4 ε): per method, one clean map per
image (cached across ε) plus, per ε, one FGSM step and one perturbed map.
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import pandas as pd
import torch

from clip_xai.config import build, pick_device, precision_scope
from clip_xai.errors import ClipXaiError

THESIS_METHODS = ["gradcam", "game", "eclip", "selfattn", "rollout", "surgery", "rise", "m2ib", "maskclip"]
THESIS_IMAGES, THESIS_EPS = 5285, 4


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


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from clip_xai.__main__ import CONF_DIR
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
              extra: list[str] | None = None) -> pd.DataFrame:
    """Measure every explainer (and the FGSM step) at each batch size; write bench.csv/bench.md.

    ``extra`` are Hydra overrides for every config; ``explainer.KEY=VALUE`` applies to the explainers
    that have KEY (e.g. ``explainer.chunk=500`` only to RISE).
    """
    device = pick_device(device_spec)
    model_name = model_name or ("vit_b16" if device.type == "cuda" else "tiny")
    extra = list(extra or [])
    per_explainer = [o for o in extra if o.lstrip("+~").startswith("explainer.")]
    overrides = [f"model={model_name}", *(o for o in extra if o not in per_explainer)]
    if random_weights and model_name != "tiny":
        overrides.append("model.pretrained=null" if model_name != "altclip" else "model.pretrained=false")
    cfg = compose(overrides)
    model = build(cfg, "model").to(device)
    rows = []
    jobs = [("fgsm (perturbation)", build(compose(overrides + ["perturbation=fgsm"]), "perturbation"), True)]
    jobs += [(name, build(_explainer_cfg(overrides, name, per_explainer), "explainer"), False) for name in explainers]
    for name, fn, is_step in jobs:
        for bs in batch_sizes:
            factory = (lambda px, tok, s, f=fn: (lambda: f(model, px, tok))) if is_step else \
                      (lambda px, tok, s, f=fn: (lambda: f(model, px, tok, s)))
            rate, used, peak = measure(model, factory, bs, device, repeats, precision)
            rows.append({"explainer": name, "batch": used, "images_per_s": rate, "peak_gib": peak})
            print(f"  {name:<20} batch {used:>3}: " + (f"{rate:9.2f} images/s" if rate else "out of memory"), flush=True)
    df = pd.DataFrame(rows)
    df.insert(0, "device", torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)")
    df.insert(1, "model", model_name + (" (random weights)" if random_weights else ""))
    df.insert(2, "precision", precision)
    if device.type != "cuda":
        df = df.drop(columns="peak_gib")
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "bench.csv", index=False)
    best = df.groupby("explainer")["images_per_s"].max()
    lines = [f"# clip_xai benchmark ({date.today()}, {platform.node()})", "", df.to_markdown(index=False, floatfmt=".2f"), ""]
    if set(THESIS_METHODS) <= set(best.index) and "fgsm (perturbation)" in best.index:
        per = {m: THESIS_IMAGES * ((1 + THESIS_EPS) / best[m] + THESIS_EPS / best["fgsm (perturbation)"])
               for m in THESIS_METHODS}
        sec, top = sum(per.values()), max(per, key=per.get)
        lines.append(f"Projected thesis sweep ({THESIS_IMAGES} images x {len(THESIS_METHODS)} methods x {THESIS_EPS} eps, "
                     f"clean maps cached, best batch per method): {sec / 3600:.2f} h on this device, "
                     f"{100 * per[top] / sec:.0f}% of it {top}.")
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
    p.add_argument("--precision", default="fp32", help="fp32 | tf32 | bf16 | fp16 (as the precision= config key)")
    p.add_argument("--set", dest="extra", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra Hydra overrides for every config, e.g. explainer.chunk=500")
    p.add_argument("--out", type=Path, default=Path("outputs/bench"))
    a = p.parse_args(argv)
    from clip_xai.__main__ import CONF_DIR

    names = a.explainers or sorted(f.stem for f in (Path(CONF_DIR) / "explainer").glob("*.yaml"))
    try:
        run_bench(a.model, a.device, a.batch_sizes, names, a.repeats, a.out, random_weights=not a.pretrained,
                  precision=a.precision, extra=a.extra)
    except ClipXaiError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
