"""Shared fixtures: small random models (never pretrained) and a batch of real sample photos."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Two threads for in-process tests on the 2-core machine; one per worker under pytest-xdist (`-n 2`),
# so that two workers do not ask for four threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def tiny():
    """The tiny random open_clip ViT (12 blocks, width 64), seeded."""
    from clip_xai.models.openclip import OpenClipAdapter

    return OpenClipAdapter("tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def altclip_tiny():
    """A small random AltCLIP (HF transformers) with the offline test tokenizer."""
    from clip_xai.models.altclip import AltClipAdapter

    return AltClipAdapter("altclip_tiny", pretrained=False, seed=0)


@pytest.fixture(scope="session", params=["tiny", "altclip_tiny"])
def any_model(request):
    """Each backend in turn (explainers must work on every one through the adapter)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def sample_images():
    """(4,3,224,224) [0,1] pixels of real photos and their captions (built-in sample set)."""
    from clip_xai.data import SampleDataset, collate

    ds = SampleDataset(limit=None)
    batch, _, _ = collate([ds[i] for i in range(4)])
    return batch.pixels, batch.captions


@pytest.fixture()
def batch_for(sample_images):
    """Callable: model -> (pixels, tokens, seeds) on that model's device."""

    def make(model, n: int = 2):
        pixels, captions = sample_images
        tokens = model.tokenize(list(captions[:n]))
        return pixels[:n].to(model.device), tokens, torch.arange(n, dtype=torch.long) + 7

    return make
