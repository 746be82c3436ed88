"""One prepared GPU check: ``make gpu-check`` (``python -m clip_xai.perf.gpu_check``), about 8 minutes on one H100.

Steps, each in its own process with its own time limit (:data:`STEPS`); a step that fails or runs
out of time is recorded in the report and the next one runs:

1. ``cuda_tests``: ``tests/test_cuda.py`` (CUDA maps equal the CPU's, every precision end to end).
2. ``bench``: the quick bench (:mod:`clip_xai.perf.bench`) of every explainer at fp32, tf32, bf16,
   ``reference`` (fp16) and, where the GPU has FP8 tensor cores, fp8; the per-method map agreement
   of each lower precision with fp32, and the ``precision=auto`` table written from it.
3. ``rise_compile``: RISE compiled against eager (the same maps? images/s of each) and the
   ``chunk: auto`` choice timed against half and double of it.
4. ``rows``: the PGD and map-attack rows on ViT-B/16 and the thesis methods on ViT-L/14.
5. ``sweep``: ``experiment=thesis_sensitivity`` end to end (basic launcher, default
   hyperparameters, all 9 methods x 4 eps) on synthetic 224² images in the RIVAL10 layout, each
   phase timed (summary.json ``run.phases``); the slow methods (bench rate under
   :data:`SLOW_RATE` images/s) on fewer images. From it the full sweep (5,285 images) is
   projected per precision, with the bench's rate ratios between precisions, against the goal:
   under one H100-hour with every method at mean Spearman >= 0.99 against fp32.

Writes ``<out>/report.md`` and CSVs (``steps.csv``, ``cuda_tests.csv``, ``bench.csv``,
``agreement.csv``, ``rise_compile.csv``, ``rows.csv``, ``sweep_phases.csv``, ``projection.csv``);
every CSV row carries the device, driver, torch version, date and precision it was measured with.
:mod:`clip_xai.perf.tables` turns them into the documentation's tables.

Without a CUDA GPU it stops at once with one line (exit code 2). ``--dry`` (``make gpu-check
DRY=1``) runs every step on the tiny model on the CPU with tiny sizes and writes the same report
(the test suite runs it; its lower-precision bench pass times the nine thesis methods, while
every explainer's bf16 maps are in its agreement table); precisions the CPU refuses are recorded as refused. ``--dry
--one-process`` runs the steps one after the other in this process instead of a child each
(:func:`run_step_here`: no time limit, four interpreter start-ups fewer; what the test suite runs,
beside one test of the per-step child and its time limit).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from clip_xai.errors import ClipXaiError

DEFAULT_OUT = Path("outputs") / "gpu-check"
# name -> (limit in seconds on the GPU, limit in the dry run); the GPU limits sum to 460 s, which
# leaves the 8-minute budget room for process start-ups and the report
STEPS: dict[str, tuple[int, int]] = {
    "cuda_tests": (60, 240), "bench": (120, 900), "rise_compile": (80, 300), "rows": (50, 300), "sweep": (150, 900),
}
PRECISIONS = ["fp32", "tf32", "bf16", "reference", "fp8"]
THESIS_IMAGES, THESIS_EPS = 5285, [0.0157, 0.0314, 0.0627, 0.1255]
GOAL_SECONDS, GOAL_SPEARMAN = 3600.0, 0.99
SLOW_RATE = 50.0  # images/s below which a method gets the sweep's small image count
SWEEP_PHASES = ["model_build", "data", "clean_maps", "perturbation", "perturbed_maps", "similarity", "metrics",
                "writing", "other"]
MAP_PHASES = ("clean_maps", "perturbed_maps")  # scale with the explainer's rate between precisions


class Sizes:
    """What each step runs: the real check's sizes, or the dry run's tiny ones."""

    def __init__(self, dry: bool, limit_scale: float = 1.0):
        self.dry, self.limit_scale = dry, limit_scale
        self.model = "tiny" if dry else "vit_b16"
        self.large = ["model=tiny"] if dry else ["model=open_clip", "model.arch=ViT-L-14-quickgelu"]  # random weights
        self.large_label = "tiny (dry run: stands in for ViT-L/14)" if dry else "ViT-L/14 (random weights)"
        self.batch_sizes = [2] if dry else [16, 64]
        # the bench's cost knobs divided by these (RISE: 2,000 masks -> 50 on the GPU, 4 in the dry run)
        self.quick_divisor = {"n_masks": 500, "n_masks_text": 50, "steps": 10} if dry else None
        self.repeats = 1 if dry else 3
        self.agreement = 2 if dry else 4
        self.rise_masks = 8 if dry else 2000
        self.rise_batch = 2 if dry else 16
        self.chunk_masks = 8 if dry else 500
        self.sweep_images = 4 if dry else 192
        self.sweep_slow_images = 2 if dry else 8
        self.compile_backend = "eager" if dry else "inductor"  # dry: the code path without a C++ compiler
        # the bench's lower-precision passes: every explainer on the GPU; in the dry run the thesis
        # methods (every explainer's lower-precision maps are still computed, by the fp32 pass's
        # agreement table, so the dry run proves them without timing each twice)
        self.lower_precisions_thesis_only = dry


# -- provenance ------------------------------------------------------------------------------------

def driver_version() -> str:
    """NVIDIA driver version (``nvidia-smi``), or ``none`` without one."""
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def provenance(device: torch.device) -> dict:
    """device, driver, torch version and date (UTC) for every row."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": name, "driver": driver_version() if device.type == "cuda" else "none",
            "torch": torch.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def stamp(df: pd.DataFrame, prov: dict, precision: str | None = None) -> pd.DataFrame:
    """``df`` with the provenance columns first (and ``precision`` where the rows lack one)."""
    df = df.copy()
    if precision is not None and "precision" not in df.columns:
        df.insert(0, "precision", precision)
    for i, (k, v) in enumerate(prov.items()):
        if k in df.columns:
            df = df.drop(columns=k)
        df.insert(i, k, v)
    return df


def _device(sizes: Sizes) -> torch.device:
    return torch.device("cpu" if sizes.dry else "cuda")


# -- steps -----------------------------------------------------------------------------------------

def step_cuda_tests(out: Path, sizes: Sizes) -> None:
    """tests/test_cuda.py under pytest; one row per test with its outcome (all skipped without CUDA).
    pytest gets a few seconds less than the step, so the tests finished by then are still recorded."""
    import re

    repo = Path(__file__).resolve().parents[2]
    limit = int(STEPS["cuda_tests"][1 if sizes.dry else 0] * sizes.limit_scale) - 8
    args = [sys.executable, "-m", "pytest", str(repo / "tests" / "test_cuda.py"), "-vv", "-p", "no:cacheprovider"]
    try:
        res = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=max(1, limit))
        text, timed_out, rc = res.stdout, False, res.returncode
    except subprocess.TimeoutExpired as err:
        out_text = err.stdout or ""
        text, timed_out, rc = out_text.decode(errors="replace") if isinstance(out_text, bytes) else out_text, True, None
    print(text[-4000:])
    found = re.findall(r"^(?:\S*?)(test_cuda\.py::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, flags=re.M)
    rows = [{"test": test, "outcome": outcome.lower()} for test, outcome in found]
    stamp(pd.DataFrame(rows, columns=["test", "outcome"]), provenance(_device(sizes)), "per test").to_csv(
        out / "cuda_tests.csv", index=False)
    failed = sum(r["outcome"] in ("failed", "error") for r in rows)
    if timed_out:
        raise RuntimeError(f"CUDA tests ran out of time after {len(rows)} tests ({failed} failed)")
    if rc not in (0, 5) or failed:
        raise RuntimeError(f"CUDA tests failed ({failed} of {len(rows)}; pytest exit {rc})")


def _precision_refusal(device: torch.device, precision: str) -> str | None:
    from clip_xai.config import check_precision

    try:
        check_precision(device, precision)
    except ClipXaiError as err:
        return err.problem
    return None


def step_bench(out: Path, sizes: Sizes) -> None:
    """The quick bench at every precision (refused ones recorded), the agreement table, the auto table."""
    from clip_xai.perf.bench import THESIS_METHODS, run_bench
    from clip_xai.config import resolve_precision
    from clip_xai.paths import CONF_DIR

    device = _device(sizes)
    prov = provenance(device)
    names = sorted(f.stem for f in (Path(CONF_DIR) / "explainer").glob("*.yaml"))
    frames, refused = [], []
    done = set()
    for precision in PRECISIONS:
        reason = _precision_refusal(device, precision)
        actual = resolve_precision(device, precision) if reason is None else None
        if reason is None and actual in done:  # reference on a CPU is strict fp32: measured already
            reason = f"resolves to {actual} on {device.type}: its rows are the {actual} rows"
        if reason is not None:
            refused.append({"precision": precision, "refused": reason})
            continue
        done.add(actual)
        first = not frames
        benched = [n for n in names if n in THESIS_METHODS] if sizes.lower_precisions_thesis_only and not first else names
        df = run_bench(sizes.model, str(device), sizes.batch_sizes, benched, sizes.repeats, out / "bench" / precision,
                       precision=precision, agreement=sizes.agreement if first else 0, perturbations=(),
                       quick=True, tables=out / "precision" if first else None, quick_divisor=sizes.quick_divisor)
        df["precision"] = actual if precision != "reference" else f"reference ({actual})"
        frames.append(df)
        pd.concat(frames).pipe(stamp, prov).to_csv(out / "bench.csv", index=False)  # partial results survive a timeout
        if first:
            agree = pd.read_csv(out / "bench" / precision / "agreement.csv")
            stamp(agree, prov).to_csv(out / "agreement.csv", index=False)
    stamp(pd.DataFrame(refused, columns=["precision", "refused"]), prov).to_csv(out / "refused.csv", index=False)


def _rise_maps(rise, model, pixels, tokens, seeds, device, repeats: int) -> tuple[torch.Tensor, float]:
    from clip_xai.perf.timing import median_time

    maps = rise(model, pixels, tokens, seeds).float()
    sec = median_time(lambda: rise(model, pixels, tokens, seeds), device, repeats, slow=1e9)
    return maps, pixels.shape[0] / sec


def step_rise_compile(out: Path, sizes: Sizes) -> None:
    """Compiled vs eager RISE (maps, images/s) in bf16, then chunk auto vs half and double of it."""
    from clip_xai.perf.bench import _inputs, compose
    from clip_xai.config import build, precision_scope
    from clip_xai.explainers.rise import RISE
    from clip_xai.metrics.sensitivity import spearman

    device = _device(sizes)
    prov = provenance(device)
    precision = "bf16"
    over = [f"model={sizes.model}"] + ([] if sizes.dry else ["model.pretrained=null"])
    model = build(compose(over), "model").to(device)
    px, tok, seeds = _inputs(model, sizes.rise_batch, device)
    rows = []
    with precision_scope(device, precision):
        eager = RISE(n_masks=sizes.rise_masks, compile=False)
        compiled = RISE(n_masks=sizes.rise_masks, compile=True, compile_backend=sizes.compile_backend)
        start = time.perf_counter()
        compiled(model, px, tok, seeds)  # compilation (warm-up), timed on its own
        warmup = time.perf_counter() - start
        m_eager, r_eager = _rise_maps(eager, model, px, tok, seeds, device, sizes.repeats)
        m_comp, r_comp = _rise_maps(compiled, model, px, tok, seeds, device, sizes.repeats)
        rho = spearman(m_eager, m_comp)
        diff = (m_eager - m_comp).abs().max().item()
        rows.append({"what": "eager", "masks": sizes.rise_masks, "batch": sizes.rise_batch, "chunk": eager.chunk_size(model, device),
                     "images_per_s": r_eager, "warmup_s": None, "max_abs_diff": 0.0, "min_spearman": 1.0})
        rows.append({"what": f"compiled ({sizes.compile_backend})", "masks": sizes.rise_masks, "batch": sizes.rise_batch,
                     "chunk": compiled.chunk_size(model, device), "images_per_s": r_comp, "warmup_s": warmup,
                     "max_abs_diff": diff, "min_spearman": rho.min().item()})
        auto = RISE(n_masks=sizes.chunk_masks, compile=False).chunk_size(model, device)
        for label, chunk in (("auto", auto), ("auto / 2", max(1, auto // 2)), ("auto x 2", auto * 2)):
            rise = RISE(n_masks=sizes.chunk_masks, chunk=chunk, compile=False)
            _, rate = _rise_maps(rise, model, px, tok, seeds, device, sizes.repeats)
            rows.append({"what": f"chunk {label}", "masks": sizes.chunk_masks, "batch": sizes.rise_batch, "chunk": chunk,
                         "images_per_s": rate, "warmup_s": None, "max_abs_diff": None, "min_spearman": None})
    df = stamp(pd.DataFrame(rows), prov, precision)
    df.insert(5, "model", sizes.model + ("" if sizes.dry else " (random weights)"))
    df.to_csv(out / "rise_compile.csv", index=False)


def step_rows(out: Path, sizes: Sizes) -> None:
    """PGD and map-attack rows on the bench model; the thesis methods on the large model (bf16)."""
    from clip_xai.perf.bench import THESIS_METHODS, run_bench

    device = _device(sizes)
    prov = provenance(device)
    frames = []
    b16 = run_bench(sizes.model, str(device), sizes.batch_sizes, [], sizes.repeats, out / "rows" / "attacks",
                    precision="bf16", agreement=0, quick=True, quick_divisor=sizes.quick_divisor)
    frames.append(b16)
    pd.concat(frames).pipe(stamp, prov).to_csv(out / "rows.csv", index=False)
    model_name, extra = sizes.large[0].split("=", 1)[1], sizes.large[1:]
    large = run_bench(model_name, str(device), sizes.batch_sizes[:1], THESIS_METHODS, sizes.repeats,
                      out / "rows" / "large", precision="bf16", agreement=0, perturbations=(), quick=True, extra=extra,
                      quick_divisor=sizes.quick_divisor)
    large["model"] = sizes.large_label
    frames.append(large)
    pd.concat(frames).pipe(stamp, prov).to_csv(out / "rows.csv", index=False)


def write_synthetic_rival10(root: Path, n: int, size: int = 224, seed: int = 0) -> Path:
    """``n`` synthetic size² JPEGs in the RIVAL10 test layout (smooth colour fields with a bright
    blob, one wnid per class in turn); returns the dataset root."""
    import numpy as np
    from PIL import Image

    from clip_xai.data.rival10 import RIVAL10_WNIDS

    folder = root / "RIVAL10" / "test" / "ordinary"
    folder.mkdir(parents=True, exist_ok=True)
    wnids = list(RIVAL10_WNIDS)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        base = rng.uniform(0, 1, 3)[None, None] * (0.5 + 0.5 * np.sin(6 * xx[..., None] + rng.uniform(0, 6, 3)))
        cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.08, 0.25)]
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = np.clip(base * (1 - blob) + blob * rng.uniform(0.6, 1, 3), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{wnids[i % len(wnids)]}_{i}.JPEG", quality=90)
    return root


def _sweep_groups(sizes: Sizes, device: torch.device, precision: str) -> list[tuple[list[str], int, list[str]]]:
    """(methods, images, extra overrides) per multirun: the fast methods together on the full image
    count, each slow one (bench rate under SLOW_RATE) alone on fewer images (dry: quick knobs)."""
    from clip_xai.perf.bench import THESIS_METHODS, _explainer_cfg, quick_overrides
    from clip_xai.perf.projection import MEASURED, rate_key

    key = rate_key(device, precision)
    rates = MEASURED[key][1] if key else {}
    fast = [m for m in THESIS_METHODS if rates.get(m, SLOW_RATE) >= SLOW_RATE]
    groups = [(fast, sizes.sweep_images, [])]
    for m in THESIS_METHODS:
        if m not in fast:
            over = quick_overrides(_explainer_cfg([f"model={sizes.model}"], m, []), "explainer",
                                   sizes.quick_divisor)[0] if sizes.dry else []
            groups.append(([m], sizes.sweep_slow_images, over))
    return groups


def step_sweep(out: Path, sizes: Sizes) -> None:
    """experiment=thesis_sensitivity on synthetic images, phases from each job's summary.json."""
    from clip_xai.config import resolve_precision

    device = _device(sizes)
    prov = provenance(device)
    precision = resolve_precision(device, "reference")  # the experiment's own setting
    data = write_synthetic_rival10(out / "sweep" / "data", sizes.sweep_images)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           **({"OMP_NUM_THREADS": "1"} if sizes.dry else {})}
    rows = []
    for i, (methods, images, extra) in enumerate(_sweep_groups(sizes, device, precision)):
        name = f"group{i}"
        args = [sys.executable, "-m", "clip_xai", "-m", "experiment=thesis_sensitivity", f"model={sizes.model}",
                f"dataset.root={data}", f"dataset.limit={images}", "logger=none", f"device={device.type}",
                "cache=true", f"output_root={out / 'sweep' / 'runs'}", f"name={name}",
                f"explainer={','.join(methods)}", *extra] + ([] if sizes.dry else ["model.pretrained=null"])
        start = time.perf_counter()
        res = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        print(" ".join(args[2:]), f"-> rc {res.returncode} in {wall:.1f} s\n", res.stderr[-3000:])
        if res.returncode != 0:
            raise RuntimeError(f"sweep {name} ({','.join(methods)}) exited {res.returncode}: {res.stderr.strip()[-300:]}")
        for summary_path in sorted((out / "sweep" / "runs" / name).glob("*/summary.json")):
            summary = json.loads(summary_path.read_text())
            run = summary["run"]
            eps = float(OmegaConf.load(summary_path.parent / "config.yaml").perturbation.eps)
            for phase, sec in run.get("phases", {}).items():
                rows.append({"explainer": summary["explainer"], "eps": eps,
                             "images": run["new_rows"], "phase": phase, "seconds": sec, "precision": run["precision"],
                             "settings": " ".join(extra) or "defaults", "cache_hits": summary.get("cache_hits")})
        pd.DataFrame(rows).pipe(stamp, prov).to_csv(out / "sweep_phases.csv", index=False)
    projection_table(out, prov).to_csv(out / "projection.csv", index=False)


# -- projection ------------------------------------------------------------------------------------

def _best_rates(bench: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(method, precision) -> best warm rate at the yaml defaults."""
    col = "images_per_s_at_defaults" if "images_per_s_at_defaults" in bench.columns else "images_per_s"
    warm = bench[bench.cache.astype(str) != "cold"]
    prec = warm.precision.astype(str).str.replace(r"^reference \((\w+)\)$", r"\1", regex=True)
    return warm.assign(p=prec).groupby(["explainer", "p"])[col].max().to_dict()


def projection_table(out: Path, prov: dict) -> pd.DataFrame:
    """The full thesis sweep per precision (as run, each benched precision, and auto) from the
    sweep's phases: per method, each job's phase seconds scaled from the sweep's images to 5,285
    (model builds as they are: one per job), map phases scaled by the bench's rate ratio between
    the precisions (FGSM's for the perturbation); with each method's agreement with fp32."""
    phases = pd.read_csv(out / "sweep_phases.csv")
    bench = pd.read_csv(out / "bench.csv") if (out / "bench.csv").is_file() else None
    agree = pd.read_csv(out / "agreement.csv") if (out / "agreement.csv").is_file() else None
    rates = _best_rates(bench) if bench is not None else {}
    ran = str(phases.precision.iloc[0])
    agreement = {(r.explainer, r.precision): r.mean_spearman for r in agree.itertuples()} if agree is not None else {}
    agreement_of = lambda m, p: 1.0 if p == "fp32" else agreement.get((m, p), float("nan"))  # noqa: E731
    benched = sorted({p for _, p in rates}) if rates else []
    auto = {}
    if (out / "precision").is_dir():
        for path in (out / "precision").glob("*.csv"):
            auto.update(dict(pd.read_csv(path)[["explainer", "precision"]].itertuples(index=False)))
    targets = [ran] + [p for p in benched if p != ran] + (["auto"] if auto else [])
    rows = []
    for target in targets:
        per_method = {}
        for method, g in phases.groupby("explainer"):
            prec = auto.get(method, "fp32") if target == "auto" else target
            total = 0.0
            for r in g.itertuples():
                scale = 1.0 if r.phase == "model_build" else THESIS_IMAGES / max(1, r.images)
                if prec != ran and r.phase in MAP_PHASES + ("perturbation",):
                    key = method if r.phase in MAP_PHASES else "fgsm (perturbation)"
                    a, b = rates.get((key, ran)), rates.get((key, prec))
                    scale *= (a / b) if a and b else float("nan")
                total += r.seconds * scale
            per_method[method] = (total, prec)
        seconds = sum(t for t, _ in per_method.values())
        worst = min(per_method, key=lambda m: agreement_of(m, per_method[m][1]))
        worst_rho = agreement_of(worst, per_method[worst][1])
        top = max(per_method, key=lambda m: per_method[m][0])
        meets = seconds < GOAL_SECONDS and worst_rho >= GOAL_SPEARMAN
        rows.append({"precision": target if target != ran else f"{ran} (as run)", "projected_h": seconds / 3600,
                     "goal_h": GOAL_SECONDS / 3600, "x_goal": seconds / GOAL_SECONDS,
                     "largest_share": f"{top} ({100 * per_method[top][0] / seconds:.0f}%)",
                     "worst_agreement": f"{worst} ({worst_rho:.4f})", "meets_goal": bool(meets),
                     "per_method_precision": ", ".join(f"{m}={p}" for m, (_, p) in per_method.items())
                     if target == "auto" else target})
    return stamp(pd.DataFrame(rows), prov)


# -- orchestration ---------------------------------------------------------------------------------

STEP_FUNCTIONS = {"cuda_tests": step_cuda_tests, "bench": step_bench, "rise_compile": step_rise_compile,
                  "rows": step_rows, "sweep": step_sweep}


def run_step(name: str, out: Path, dry: bool, limit_scale: float = 1.0) -> dict:
    """Run one step in a child process with its time limit (times ``limit_scale``); its status row."""
    limit = int(STEPS[name][1 if dry else 0] * limit_scale)
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "clip_xai.perf.gpu_check", "--step", name, "--out", str(out),
            f"--limit-scale={limit_scale}"] + (["--dry"] if dry else [])
    start = time.perf_counter()
    with log.open("w") as f:  # its own process group, so a timeout also ends what the step started
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out after {limit} s"
    wall = time.perf_counter() - start
    note = ""
    if status != "ok":
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        note = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")[:300]
    print(f"gpu-check {name}: {status} ({wall:.0f} s of {limit} s)", flush=True)
    return {"step": name, "status": status, "seconds": round(wall, 1), "limit_s": limit, "note": note}


def run_step_here(name: str, out: Path, sizes: Sizes) -> dict:
    """Run one step in this process (``--dry --one-process``), its output in the same log as
    :func:`run_step`'s child; an exception is recorded as the step's failure and the next step runs.
    No time limit applies (``limit_s`` is empty)."""
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    status, note = "ok", ""
    start = time.perf_counter()
    with log.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            STEP_FUNCTIONS[name](out, sizes)
        except Exception as err:  # noqa: BLE001 (any error of a step is that step's status, as a child's exit)
            traceback.print_exc()
            status, note = "failed (error)", f"{type(err).__name__}: {err}"[:300]
    wall = time.perf_counter() - start
    print(f"gpu-check {name}: {status} ({wall:.0f} s, in this process)", flush=True)
    return {"step": name, "status": status, "seconds": round(wall, 1), "limit_s": None, "note": note}


def _table(path: Path, cols: list[str] | None = None, floatfmt: str = ".4g") -> str:
    if not path.is_file():
        return "_not written (see the step's status and log)_"
    df = pd.read_csv(path)
    if cols:
        df = df[[c for c in cols if c in df.columns]]
    return df.to_markdown(index=False, floatfmt=floatfmt) if len(df) else "_empty_"


def write_report(out: Path, dry: bool, prov: dict) -> Path:
    """report.md from the CSVs the steps wrote (sections for missing CSVs say so)."""
    short = ["precision", "explainer", "cache", "batch", "settings", "images_per_s", "images_per_s_at_defaults",
             "gflop_per_image", "tflops_per_s", "peak_share_pct", "peak_gib"]
    lines = [f"# GPU check{' (DRY RUN: tiny model on the CPU, tiny sizes; no GPU number here)' if dry else ''}", "",
             f"Device: {prov['device']}; driver {prov['driver']}; torch {prov['torch']}; {prov['date']}. "
             "Every CSV row beside this report carries these and its precision.", "",
             "## Steps", "", _table(out / "steps.csv"), "",
             "## 1. CUDA tests", "", _cuda_summary(out), "",
             "## 2. Bench per precision (quick: masks and steps reduced, rates scaled to the defaults)", "",
             _table(out / "bench.csv", short), "", "Precisions not run here:", "", _table(out / "refused.csv", ["precision", "refused"]), "",
             "### Map agreement with fp32 (mean Spearman)", "",
             _table(out / "agreement.csv", ["explainer", "precision", "samples", "mean_spearman", "min_spearman", "nan_pairs"]), "",
             "## 3. RISE compiled vs eager; chunk rule against its neighbours", "",
             _table(out / "rise_compile.csv", ["precision", "model", "what", "masks", "batch", "chunk", "images_per_s",
                                               "warmup_s", "max_abs_diff", "min_spearman"]), "",
             "## 4. PGD, map-attack and large-model rows", "", _table(out / "rows.csv", ["model", *short]), "",
             "## 5. Thesis sweep: phases and projection", "", _sweep_summary(out), "",
             f"Projection of the full sweep ({THESIS_IMAGES} images x 9 methods x {len(THESIS_EPS)} eps) against the goal "
             f"(< {GOAL_SECONDS / 3600:g} h with every method at mean Spearman >= {GOAL_SPEARMAN} against fp32):", "",
             _table(out / "projection.csv", ["precision", "projected_h", "x_goal", "largest_share", "worst_agreement",
                                             "meets_goal", "per_method_precision"]), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _cuda_summary(out: Path) -> str:
    path = out / "cuda_tests.csv"
    if not path.is_file():
        return "_not written_"
    df = pd.read_csv(path)
    counts = df.outcome.value_counts().to_dict()
    failed = df[df.outcome == "failed"].test.tolist()
    return (f"{len(df)} tests: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            + (f". Failed: {', '.join(failed)}" if failed else "") + ".")


def _sweep_summary(out: Path) -> str:
    path = out / "sweep_phases.csv"
    if not path.is_file():
        return "_not written_"
    df = pd.read_csv(path)
    wide = df.pivot_table(index=["explainer", "precision", "images"], columns="phase", values="seconds", aggfunc="sum")
    wide = wide[[p for p in SWEEP_PHASES if p in wide.columns]].reset_index()
    return ("Seconds per phase, summed over the 4 eps jobs of each method (clean maps come from the cache "
            "after the first eps):\n\n" + wide.to_markdown(index=False, floatfmt=".3g"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clip-xai-gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="every step on the tiny model on the CPU with tiny sizes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--step", choices=list(STEP_FUNCTIONS), help="run one step in this process (used by the check itself)")
    p.add_argument("--steps", nargs="+", choices=list(STEP_FUNCTIONS), default=list(STEP_FUNCTIONS),
                   help="which steps to run (default: all)")
    p.add_argument("--limit-scale", type=float, default=1.0,
                   help="multiply every step's time limit (a slow or shared machine; the dry run's test uses 3)")
    p.add_argument("--one-process", action="store_true",
                   help="with --dry: every step in this process, without the per-step child and its time limit")
    a = p.parse_args(argv)
    if a.one_process and not a.dry:
        print("gpu-check: --one-process is for the dry run only (on a GPU each step keeps its own process and "
              "time limit); add --dry or leave --one-process out", file=sys.stderr)
        return 2
    if not a.dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); `make gpu-check DRY=1` runs the dry check on the CPU",
              file=sys.stderr)
        return 2
    sizes = Sizes(a.dry, a.limit_scale)
    a.out.mkdir(parents=True, exist_ok=True)
    if (a.step or a.one_process) and a.dry:  # a proof of the code paths, not a measurement: one thread,
        torch.set_num_threads(1)  # no contention with itself
    if a.step:
        STEP_FUNCTIONS[a.step](a.out, sizes)
        return 0
    start = time.perf_counter()
    statuses = []
    for name in a.steps:
        statuses.append(run_step_here(name, a.out, sizes) if a.one_process else run_step(name, a.out, a.dry, a.limit_scale))
        pd.DataFrame(statuses).to_csv(a.out / "steps.csv", index=False)
    prov = provenance(_device(sizes))
    stamp(pd.DataFrame(statuses), prov, "per step").to_csv(a.out / "steps.csv", index=False)
    path = write_report(a.out, a.dry, prov)
    print(f"gpu-check: {sum(s['status'] == 'ok' for s in statuses)} of {len(statuses)} steps ok in "
          f"{time.perf_counter() - start:.0f} s; report {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
