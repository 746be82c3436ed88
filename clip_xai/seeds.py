"""Seeds derived from the run's seed: one helper below every room, so models, perturbations,
metrics and studies draw per-sample randomness the same way without importing the config layer."""
from __future__ import annotations

import hashlib


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample seed from the global seed and the sample id (stable across batchings)."""
    return int(hashlib.sha1(f"{seed}:{sample_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
