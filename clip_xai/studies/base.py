"""The loop both studies share: resume, batches, bad images, OOM back-off, rows, summary, sinks.

A study subclass says which columns it writes and how one batch becomes rows
(:meth:`Study.process`); everything else — skipping samples a previous run already wrote,
setting aside run-dir files damaged outside the program, counting unreadable images, halving the
batch on out-of-memory, writing results after every batch, the summary and W&B — lives here once.
"""
from __future__ import annotations

import json
import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pyarrow import ArrowException
from torch.utils.data import Subset

from clip_xai.config import precision_scope
from clip_xai.progress import Job
from clip_xai.data import make_loader
from clip_xai.data.captions import TOO_LONG, TRUNCATED, check_policy, fit_captions
from clip_xai.errors import ClipXaiError
from clip_xai.schema import DONE_FILE, EXAMPLES_FILE, RESULTS_FILE, RUN_COLUMNS, SUMMARY_FILE
from clip_xai.seeds import sample_seed
from clip_xai.sinks.results import ResultsWriter
from clip_xai.perf.timing import PhaseTimer
from clip_xai.types import Batch, TextTokens

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Everything a study needs for one job, built by the entrypoint from the config."""

    run_dir: Path
    device: torch.device
    model: object
    dataset: object
    explainer: object
    metrics: object
    ids: dict  # identity columns shared by every row (model, explainer, dataset, ...)
    seed: int = 0
    batch_size: int = 8
    num_workers: int = 0
    precision: str = "fp32"
    save_examples: int = 8
    perturbation: object | None = None
    cache: object | None = None
    sink: object | None = None
    on_long_caption: str = "skip"  # skip | truncate | error (clip_xai.data.captions)
    stats: dict = field(default_factory=lambda: {"oom_splits": 0})
    examples_left: int = field(init=False)  # examples.npz slots still open; studies skip the rest
    # seconds per phase (summary.json run.phases): the loop times data, writing and the study's
    # process call; a study names its own phases inside (sensitivity: clean_maps, perturbation, ...)
    # and what it leaves unnamed is "other"; the entrypoint adds model_build
    phases: PhaseTimer = field(init=False)

    def __post_init__(self):
        self.examples_left = self.save_examples
        self.phases = PhaseTimer(self.device)


@dataclass
class Prepared:
    """A batch moved to the device with its tokens and per-sample seeds."""

    batch: Batch
    pixels: torch.Tensor
    tokens: TextTokens
    seeds: torch.Tensor

    def index(self, sl: slice) -> "Prepared":
        b = self.batch
        sub = Batch(b.sample_ids[sl], b.pixels[sl], b.captions[sl], b.labels[sl],
                    None if b.object_masks is None else b.object_masks[sl])
        return Prepared(sub, self.pixels[sl], self.tokens.index(sl), self.seeds[sl])


class Study:
    """Base of the sensitivity and faithfulness studies."""

    name: str
    columns: list[str]
    metric_columns: list[str]
    metrics_suite: str
    uses_perturbation: bool = False  # the entrypoint builds `perturbation` only for studies that use it

    def __init__(self, name: str):
        self.name = name

    # -- hooks for subclasses ---------------------------------------------------------------
    def check(self, ctx: RunContext) -> None:
        """Validate the combination of model/explainer/metrics before any work is done."""
        if getattr(ctx.metrics, "suite", None) != self.metrics_suite:
            raise ClipXaiError(f"study={self.name} needs metrics={self.metrics_suite}",
                               f"add metrics={self.metrics_suite} to the command line")
        ctx.explainer.check_requirements(ctx.model)
        ctx.explainer.check_model(ctx.model)
        check_policy(ctx.on_long_caption)
        if self.uses_perturbation:
            if ctx.perturbation is None:
                raise ClipXaiError(f"study={self.name} needs a perturbation", "add perturbation=fgsm")
            ctx.perturbation.bind(ctx.explainer, ctx.model)  # attacks on maps check the explainer here
            ctx.perturbation.bind_data(ctx.dataset)  # class names (classes=auto), X-Shift's mask check

    def check_data(self, dataset) -> None:
        """Validate the dataset right after it is built, before the model is loaded."""

    def process(self, ctx: RunContext, prep: Prepared) -> tuple[list[dict], dict]:
        """Rows for one batch plus example arrays (name → (k, ...) numpy) for examples.npz, for the
        first ``k = ctx.examples_left`` samples only (none once the file's slots are filled)."""
        raise NotImplementedError

    def empty_row(self, ctx: RunContext, sample_id: str, caption: str, label: int, flag: str) -> dict:
        """A row for a sample with no result (unreadable image): NaN metrics, flagged."""
        row = {c: float("nan") for c in self.columns}
        row.update(ctx.ids, sample_id=sample_id, caption=caption, label=label, map_flag=flag, study=self.name)
        return row

    def extra_summary(self, ctx: RunContext) -> dict:
        return {}

    def pooled_means(self, frame) -> dict:
        """summary.json means that are not the mean of a column's finite values (e.g. ratios of
        sums over the rows); they replace the plain means under the same names."""
        return {}

    # -- the loop ---------------------------------------------------------------------------
    def run(self, ctx: RunContext) -> dict:
        self.check(ctx)
        columns = self.columns + [c for c in RUN_COLUMNS if c not in self.columns]
        writer, set_aside_files = open_run_dir(ctx.run_dir, columns)  # damaged files moved aside, with a warning
        done = writer.done_ids()
        ids = ctx.dataset.sample_ids
        todo = [i for i, sid in enumerate(ids) if sid not in done]
        if writer.resumed_rows:
            log.info("resuming %s: %d samples already in results.parquet, %d to go", ctx.run_dir, len(done), len(todo))
        records = {r.sample_id: r for r in ctx.dataset.records}
        loader = make_loader(Subset(ctx.dataset, todo), ctx.batch_size, ctx.num_workers,
                             pin_memory=ctx.device.type == "cuda")
        examples: dict[str, list] = {}
        start = time.perf_counter()
        with Job(len(todo), f"{ctx.ids['explainer']}") as progress:  # closed on error too; tasks print its ETA
            batches = iter(loader)
            while True:
                with ctx.phases.phase("data"):
                    got = next(batches, None)
                if got is None:
                    break
                batch, _, skipped = got
                rows = [self.empty_row(ctx, sid, records[sid].caption, records[sid].label, "bad_image") for sid in skipped]
                fitted = fit_captions(ctx.model, batch, ctx.on_long_caption) if len(batch) else None
                if fitted is not None:
                    batch = fitted.batch
                    rows += [self.empty_row(ctx, sid, records[sid].caption, records[sid].label, TOO_LONG)
                             for sid in fitted.too_long]
                if len(batch):
                    named = sum(ctx.phases.seconds.values())
                    start_process = time.perf_counter()
                    new_rows, ex = self._process_with_backoff(ctx, self._prepare(ctx, batch))
                    ctx.phases.add("other", time.perf_counter() - start_process - (sum(ctx.phases.seconds.values()) - named))
                    rows += new_rows
                    self._collect_examples(examples, ex, ctx.save_examples)
                    ctx.examples_left = ctx.save_examples - sum(len(v) for v in examples.get("sample_id", []))
                for row in rows:
                    row["caption_flag"] = TRUNCATED if fitted is not None and row["sample_id"] in fitted.truncated else ""
                with ctx.phases.phase("writing"):
                    writer.append(rows)
                progress.update(len(batch) + len(skipped) + (len(fitted.too_long) if fitted is not None else 0))
        elapsed = time.perf_counter() - start
        if examples and not (ctx.run_dir / EXAMPLES_FILE).exists():
            np.savez_compressed(ctx.run_dir / EXAMPLES_FILE, **{k: np.concatenate(v)[: ctx.save_examples] for k, v in examples.items()})
        processed = len(writer.frame) - writer.resumed_rows
        extra = {
            "study": self.name, **{k: v for k, v in ctx.ids.items()},
            "run": {"resumed_rows": writer.resumed_rows, "new_rows": processed, "seconds": round(elapsed, 3),
                    "images_per_s": round(processed / elapsed, 3) if elapsed > 0 and processed else None,
                    "device": str(ctx.device), "batch_size": ctx.batch_size, "precision": ctx.precision,
                    "oom_splits": ctx.stats["oom_splits"], "phases": ctx.phases.rounded(),
                    "wandb_errors": getattr(ctx.sink, "errors", 0), "set_aside": set_aside_files},
            **self.extra_summary(ctx),
        }
        if ctx.cache is not None:
            extra["cache_hits"], extra["cache_misses"] = ctx.cache.hits, ctx.cache.misses
            extra["cache_damaged"] = ctx.cache.damaged
        summary = writer.summary(self.metric_columns, extra)
        summary["means"].update(self.pooled_means(writer.frame))
        if len(writer.frame) == 0:
            raise ClipXaiError(f"no samples were processed for dataset {ctx.ids.get('dataset')}",
                               "check dataset.root and dataset.limit")
        writer.finish(summary)
        if ctx.sink is not None:
            self._log_examples(ctx)
            ctx.sink.finish(writer.frame, summary)
            if ctx.sink.errors != summary["run"]["wandb_errors"]:
                summary["run"]["wandb_errors"] = ctx.sink.errors  # W&B broke while finishing: say so
                writer.finish(summary)
        return summary

    def _prepare(self, ctx: RunContext, batch: Batch) -> Prepared:
        pixels = batch.pixels.to(ctx.device, non_blocking=True)
        tokens = ctx.model.tokenize(batch.captions)
        seeds = torch.tensor([sample_seed(ctx.seed, sid) for sid in batch.sample_ids], dtype=torch.long)
        return Prepared(batch, pixels, tokens, seeds)

    def _process_with_backoff(self, ctx: RunContext, prep: Prepared) -> tuple[list[dict], dict]:
        """Process a batch; on device out-of-memory, split it in halves and retry (warned, counted)."""
        try:
            with precision_scope(ctx.device, ctx.precision):
                return self.process(ctx, prep)
        except torch.OutOfMemoryError:
            n = len(prep.batch)
            if n == 1:
                raise ClipXaiError("out of memory on a single sample", "use a smaller model, precision=bf16, or device=cpu")
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            ctx.stats["oom_splits"] += 1
            log.warning("out of memory with %d samples: retrying as two halves (lower batch_size to avoid this)", n)
            rows_a, ex_a = self._process_with_backoff(ctx, prep.index(slice(0, n // 2)))
            rows_b, ex_b = self._process_with_backoff(ctx, prep.index(slice(n // 2, n)))
            return rows_a + rows_b, {k: np.concatenate([ex_a[k], ex_b[k]]) for k in ex_a}

    @staticmethod
    def _collect_examples(store: dict, ex: dict, limit: int) -> None:
        have = sum(len(v) for v in store.get("sample_id", []))
        if have >= limit or not ex:
            return
        for k, v in ex.items():
            store.setdefault(k, []).append(v[: limit - have] if np.ndim(v) else v)

    def _log_examples(self, ctx: RunContext) -> None:
        path = ctx.run_dir / EXAMPLES_FILE
        if not path.exists():
            return
        ex = np.load(path)
        maps = {k: ex[k].astype(np.float32) for k in ("map_clean", "map_pert") if k in ex}
        ctx.sink.log_overlays(ex["image"], maps, [str(c) for c in ex["caption"]])


# -- resume: a run dir's files damaged outside the program -------------------------------------------
DAMAGED_SUFFIX = ".damaged-"


def set_aside(path: Path, problem: str) -> Path | None:
    """Rename the damaged file ``path`` to ``<name>.damaged-<UTC time>`` beside it (never deleted: it can
    be inspected or restored) and warn naming both; the caller recomputes what it held. None when
    another job moved it first (jobs of a sweep share the clean-map cache)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{stamp}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{stamp}-{n}")
    try:
        path.rename(target)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ClipXaiError(f"{path} is unreadable ({problem}) and could not be moved aside ({err.strerror or err})",
                           f"move it aside by hand (mv '{path}' '{target}') and re-run: it is recomputed") from err
    log.warning("%s is unreadable (%s): moved aside to %s, recomputing it", path, problem, target.name)
    return target


def describe(err: BaseException) -> str:
    """An exception in one short line: its type and first sentence (readers' messages run on)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
    first = text.split(". ")[0].rstrip(".")
    return f"{type(err).__name__}: {first[:160]}"


def _unreadable(path: Path, read) -> str | None:
    """Why ``read(path)`` fails (None: it reads)."""
    try:
        read(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, ArrowException) as err:
        return describe(err)
    return None


def _read_summary(path: Path) -> None:
    if not isinstance(json.loads(path.read_text()), dict):
        raise ValueError("not a JSON object")


def _read_examples(path: Path) -> None:
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            z[key]


def open_run_dir(run_dir: Path, columns: list[str]) -> tuple[ResultsWriter, dict[str, str]]:
    """The results writer of ``run_dir`` (resuming the rows its results.parquet holds), after setting
    aside the files a rerun reads or keeps that no longer read (damaged outside the program: a cut-short
    copy, a disk error): ``summary.json``, ``examples.npz`` and ``results.parquet`` (then the run
    starts over, and DONE, no longer true, is removed). Returns the writer and {file: its new name}
    (summary.json's ``run.set_aside``); each move is warned about, never silent."""
    moved: dict[str, str] = {}

    def aside(path: Path, problem: str) -> None:
        target = set_aside(path, problem)
        if target is not None:
            moved[path.name] = target.name

    for name, read in ((SUMMARY_FILE, _read_summary), (EXAMPLES_FILE, _read_examples)):
        path = run_dir / name
        problem = _unreadable(path, read) if path.is_file() else None
        if problem is not None:
            aside(path, problem)
    results = run_dir / RESULTS_FILE
    try:
        writer = ResultsWriter(run_dir, columns)
        if len(writer.frame) and "sample_id" not in writer.frame.columns:
            raise KeyError("no sample_id column")
        return writer, moved
    except (OSError, ValueError, KeyError, ArrowException) as err:
        if not results.is_file():
            raise  # not a damaged results file (e.g. an unreadable run dir): its own error
        problem = describe(err)
    aside(results, problem)
    if (run_dir / DONE_FILE).is_file():  # the run is incomplete again until this rerun finishes
        (run_dir / DONE_FILE).unlink()
        log.warning("%s: removed its %s marker; the run starts over", run_dir, DONE_FILE)
    return ResultsWriter(run_dir, columns), moved


def to_uint8_images(pixels: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) [0,1] → (B,H,W,3) uint8 for examples.npz."""
    return (pixels.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
