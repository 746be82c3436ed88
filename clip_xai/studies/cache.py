"""On-disk cache of clean maps, shared by every ε job of a sweep.

The clean map of a sample depends on the model, the explainer settings, the sample's pixels
(dataset, image size) and its seed, never on ε, so a sweep over ε computes it once. Entries live
under ``<output_root>/.cache/<key>/`` with ``key`` a hash of everything that affects the map,
one file per sample, written to a temp file and renamed into place: jobs running at the same
time may both compute an entry but can never read a half-written one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from clip_xai.sinks.results import atomic_write

# Dataset settings that select or order samples but do not change any sample's pixels.
_NOT_AFFECTING = ("limit", "subset_seed", "on_bad_image", "name", "mask")


class CleanMapCache:
    """Per-sample raw clean maps keyed by (config hash, sample id); counts hits and misses."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def _path(self, sample_id: str) -> Path:
        h = hashlib.sha1(sample_id.encode()).hexdigest()
        return self.root / h[:2] / f"{h}.pt"

    def get_or_compute(self, sample_ids: list[str], compute: Callable[[], torch.Tensor], device) -> torch.Tensor:
        paths = [self._path(s) for s in sample_ids]
        if all(p.exists() for p in paths):
            try:
                maps = torch.stack([torch.load(p, map_location=device, weights_only=True) for p in paths])
                self.hits += len(paths)
                return maps
            except (OSError, RuntimeError, EOFError):
                pass  # unreadable entry (disk trouble): recompute and overwrite
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


def cache_for(cfg: DictConfig, device: torch.device, study: str) -> CleanMapCache | None:
    """The cache for this job, or None when disabled or useless (faithfulness and randomisation
    compute each map once). Localisation shares the sensitivity study's clean maps; the
    perturbation-curve study narrows it to its class prompts (both directions share them)."""
    if not cfg.get("cache", True) or study not in ("sensitivity", "localisation", "perturbation_curve"):
        return None
    key = cache_key(cfg, torch.device(device).type)
    return CleanMapCache(Path(cfg.output_root) / ".cache" / f"{cfg.explainer.name}-{key}")
