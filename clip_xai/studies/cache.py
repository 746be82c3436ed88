"""On-disk cache of clean maps, shared by every ε job of a sweep.

The clean map of a sample depends on the model, the explainer settings, the sample's pixels
(dataset, image size) and its seed, never on ε, so a sweep over ε computes it once. Entries live
under ``<output_root>/.cache/<key>/`` with ``key`` a hash of everything that affects the map,
one file per sample, written to a temp file and renamed into place: jobs running at the same
time may both compute an entry but can never read a half-written one. An entry that no longer
reads (damaged outside the program) is moved aside as ``<entry>.damaged-<time>``, with a warning,
counted (``cache_damaged`` in summary.json) and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from clip_xai.sinks.results import atomic_write
from clip_xai.studies.base import describe, set_aside

# Dataset settings that select or order samples but do not change any sample's pixels.
_NOT_AFFECTING = ("limit", "subset_seed", "on_bad_image", "name", "mask")


class CleanMapCache:
    """Per-sample raw clean maps keyed by (config hash, sample id); counts hits, misses and damaged
    entries (moved aside and recomputed)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.damaged = 0

    def _path(self, sample_id: str) -> Path:
        h = hashlib.sha1(sample_id.encode()).hexdigest()
        return self.root / h[:2] / f"{h}.pt"

    def _load(self, paths: list[Path], device) -> torch.Tensor | None:
        """The stacked entries, or None after moving aside each one that does not read as a tensor
        (or, when they differ in shape, all of them: which one is wrong cannot be told)."""
        maps, bad = [], []
        for p in paths:
            try:
                m = torch.load(p, map_location=device, weights_only=True)
                if not isinstance(m, torch.Tensor):
                    raise TypeError(f"holds a {type(m).__name__}, not a tensor")
                maps.append(m)
            except FileNotFoundError:
                return None  # another job moved it aside meanwhile: recompute
            except (OSError, RuntimeError, EOFError, ValueError, TypeError, pickle.UnpicklingError,
                    zipfile.BadZipFile) as err:
                bad.append((p, describe(err)))
        if not bad and len({tuple(m.shape) for m in maps}) > 1:
            bad = [(p, "the entries of one batch differ in shape") for p in paths]
        for p, problem in bad:
            self.damaged += set_aside(p, f"clean-map cache entry: {problem}") is not None
        return None if bad else torch.stack(maps)

    def get_or_compute(self, sample_ids: list[str], compute: Callable[[], torch.Tensor], device) -> torch.Tensor:
        paths = [self._path(s) for s in sample_ids]
        if all(p.exists() for p in paths):
            maps = self._load(paths, device)
            if maps is not None:
                self.hits += len(paths)
                return maps
        maps = compute()
        self.misses += len(paths)
        for p, m in zip(paths, maps.detach().float().cpu()):
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(p, lambda tmp, m=m: torch.save(m.clone(), tmp))
        return maps


def cache_key(cfg: DictConfig, device_type: str) -> str:
    """Hash of the resolved model, explainer, dataset (pixel-affecting part), seed, precision and
    device type: seeded noise (RISE masks, bottleneck noise) is drawn from per-device generators,
    so a CPU clean map must never be paired with a CUDA perturbed map."""
    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items() if k not in _NOT_AFFECTING}
    parts = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "explainer": OmegaConf.to_container(cfg.explainer, resolve=True),
        "dataset": dataset, "dataset_name": cfg.dataset.name,
        "seed": int(cfg.seed), "precision": str(cfg.precision), "device": device_type,
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


# Studies whose jobs share clean maps -> their own settings that change the map (part of the key).
# Localisation shares the sensitivity study's maps; the curve studies' maps explain a class prompt
# (deletion/insertion also at a chosen geometry), shared by the two directions or modes of one target.
CACHED_STUDIES = {
    "sensitivity": (), "localisation": (),
    "perturbation_curve": ("target", "classes", "templates", "prompt", "logit_scale"),
    "deletion_insertion": ("target", "max_side", "map_size", "own_size_methods", "classes", "templates", "prompt"),
}


def cache_for(cfg: DictConfig, device: torch.device, study: str) -> CleanMapCache | None:
    """The cache for this job, or None when disabled or useless (faithfulness and randomisation
    compute each map once)."""
    if not cfg.get("cache", True) or study not in CACHED_STUDIES:
        return None
    key = cache_key(cfg, torch.device(device).type)
    settings = {k: OmegaConf.to_container(cfg.study, resolve=True).get(k) for k in CACHED_STUDIES[study]}
    if settings:  # a study's own map settings: hashed into the folder name (none: the shared folder)
        key += "-" + hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return CleanMapCache(Path(cfg.output_root) / ".cache" / f"{cfg.explainer.name}-{key}")
