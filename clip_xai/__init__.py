"""clip_xai: sensitivity and faithfulness benchmark for saliency methods on CLIP-family models.

The Python API (:mod:`clip_xai.api`) is importable from here: ``clip_xai.load_model``,
``explain``, ``perturb``, ``sensitivity``, ``faithfulness``, ``faithfulness_curves``, ``show`` and
``TokenScores``. They
are loaded on first use, so ``import clip_xai`` stays cheap (no torch, no Hydra).
"""
from clip_xai.errors import ClipXaiError

__version__ = "0.1.0"

_API = ("load_model", "explain", "perturb", "sensitivity", "faithfulness", "faithfulness_curves", "show",
        "TokenScores")
__all__ = ["ClipXaiError", *_API]


def __getattr__(name: str):
    if name in _API:
        from clip_xai import api

        return getattr(api, name)
    raise AttributeError(f"module 'clip_xai' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
