"""The one entrypoint: ``python -m clip_xai [overrides]`` or ``clip-xai [overrides]`` (``-m`` sweeps).

Composes ``conf/config.yaml`` (found by :func:`clip_xai.paths.conf_dir`), builds model, dataset, explainer,
perturbation, metrics and study from their groups, runs the study into the job's run directory
and logs to W&B.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from clip_xai.config import (apply_method_settings, build, explainer_options, methods_having, pick_device,
                             register_resolvers, resolve_precision, validate)
from clip_xai.data.captions import check_policy
from clip_xai.data.verify import preflight
from clip_xai.errors import ClipXaiError
from clip_xai.paths import CONF_DIR
from clip_xai.perf.projection import announce_if_long
from clip_xai.provenance import write_environment
from clip_xai.schema import CONFIG_FILE

log = logging.getLogger("clip_xai")


def run(cfg: DictConfig, run_dir: Path, job_num: int | None, group: str) -> dict:
    """Build every component from ``cfg`` and run its study into ``run_dir``."""
    from clip_xai.sinks.wandb_sink import WandbSink
    from clip_xai.studies.base import RunContext
    from clip_xai.studies.cache import cache_for

    checked = validate(cfg, CONF_DIR)  # every setting's type and range, before anything is built or written
    apply_method_settings(cfg, CONF_DIR, checked)  # method_settings.<this explainer> into cfg.explainer (config.yaml records it)
    device = pick_device(str(cfg.device), job_num)
    precision = resolve_precision(device, str(cfg.precision), announce=True, method=str(cfg.explainer.name),
                                  model=str(cfg.model.name), table_dir=Path(cfg.output_root) / "precision")
    if str(cfg.precision) == "auto":  # config.yaml, the clean-map cache key and every row say what ran
        cfg.precision = precision
    torch.manual_seed(cfg.seed)
    study = build(cfg, "study")
    explainer = build(cfg, "explainer")  # cheap checks (unknown option, modality) before loading weights
    perturbation = build(cfg, "perturbation") if study.uses_perturbation else None
    check_policy(str(cfg.dataset.get("on_long_caption", "skip")))
    preflight(str(cfg.dataset.name), cfg.dataset.get("root"))  # cheap root check; names `verify` if it looks wrong
    dataset = build(cfg, "dataset")
    study.check_data(dataset)
    built = time.perf_counter()
    model = build(cfg, "model").to(device)
    built = time.perf_counter() - built
    metrics = build(cfg, "metrics")
    explainer.check_requirements(model)  # one clear error naming what the model lacks, before any projection
    announce_if_long(cfg.explainer.name, dict(cfg.explainer), model, device, precision, len(dataset), study.name)
    # Written once every component is built and checked: a bad setting leaves no run dir behind.
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    write_environment(run_dir)  # provenance: code, packages, lock, hardware (the sinks copy it)
    ids = {"dataset": cfg.dataset.name, "model": cfg.model.name, "explainer": cfg.explainer.name,
           "modality": cfg.explainer.get("modality", "image"), "seed": int(cfg.seed),
           "precision": precision}
    sink = None
    if cfg.logger.name == "wandb":
        sink = WandbSink(run_dir, resolved, group=group, job_type=study.name,
                         name=f"{cfg.model.name}-{cfg.explainer.name}-{run_dir.name}",
                         mode=cfg.logger.mode, project=cfg.logger.project, entity=cfg.logger.entity,
                         tags=list(cfg.logger.tags), log_images=cfg.logger.log_images)
    ctx = RunContext(run_dir=run_dir, device=device, model=model, dataset=dataset, explainer=explainer,
                     metrics=metrics, ids=ids, seed=int(cfg.seed), batch_size=int(cfg.batch_size),
                     num_workers=_workers(cfg.num_workers, device), precision=precision,
                     save_examples=int(cfg.save_examples), perturbation=perturbation, sink=sink,
                     on_long_caption=str(cfg.dataset.get("on_long_caption", "skip")),
                     cache=cache_for(cfg, device, study.name))
    ctx.phases.add("model_build", built)
    try:
        summary = study.run(ctx)
    finally:
        if sink is not None:
            sink.finish()  # no-op if the study already finished it; closes the run on error
    log.info("%s done: %s", run_dir, json.dumps(summary["means"], default=str))
    return summary


def _workers(spec, device: torch.device) -> int:
    """``auto``: 4 loader processes on CUDA (decoding overlaps GPU work), none on CPU."""
    if str(spec) == "auto":
        return 4 if device.type == "cuda" else 0
    return int(spec)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    job_num = OmegaConf.select(hc, "job.num", default=None)
    group = Path(hc.sweep.dir).name if hc.mode.name == "MULTIRUN" else Path(hc.run.dir).parent.name
    try:
        run(cfg, Path(hc.runtime.output_dir), job_num, group)
    except ClipXaiError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def per_method_override_error(args: list[str]) -> ClipXaiError | None:
    """An ``explainer.KEY=VALUE`` override on a command line whose ``explainer=`` names a method
    without KEY: Hydra would stop with "Could not override" and suggest ``+explainer.KEY``, which
    only moves the failure into the method's constructor. Say instead which methods lack KEY and
    point a setting that some of them have to ``method_settings`` (None: nothing to say; every
    other malformed override is left to Hydra's own message)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-") and "=" in a])
        names = [n for o in overrides if o.key_or_group == "explainer" and o.type == OverrideType.CHANGE
                 for n in (o.sweep_string_iterator() if o.is_sweep_override() else [str(o.value())])]
    except HydraException:
        return None
    if not names or not set(names) <= set(explainer_options(CONF_DIR)):
        return None  # the default or an experiment's sweep picks the methods; unknown options are Hydra's to report
    for o in overrides:
        if o.type != OverrideType.CHANGE or not o.key_or_group.startswith("explainer."):
            continue
        key = o.key_or_group.split(".")[1]
        having = methods_having(CONF_DIR, key, names)
        lacking = [n for n in names if n not in having]
        if not lacking:
            continue
        if having:
            return ClipXaiError(f"{o.input_line} applies to every method of the command, but explainer="
                                f"{','.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no setting {key!r} "
                                f"(only {', '.join(having)} {'has' if len(having) == 1 else 'have'} it)",
                                "give it to the methods that have it: " + " ".join(
                                    f"+method_settings.{n}.{o.input_line.removeprefix('explainer.')}" for n in having))
        verb = "has" if len(names) == 1 else "have"
        return ClipXaiError(f"{o.input_line}: explainer={','.join(names)} {verb} no setting {key!r}",
                            "use a setting listed in conf/explainer/<method>.yaml")
    return None


def main() -> None:
    if not (Path(CONF_DIR) / "config.yaml").is_file():
        err = ClipXaiError(f"no {CONF_DIR}/config.yaml: this clip_xai install was built without its configs",
                           "install a wheel or sdist made by `python -m build`, or `pip install -e .` in a checkout")
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    err = per_method_override_error(sys.argv[1:])
    if err is not None:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    register_resolvers()
    hydra_main()


if __name__ == "__main__":
    main()
