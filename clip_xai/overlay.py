"""Heat-map overlays for figures and W&B (one implementation for every consumer)."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H,W,3) uint8 image + (H,W) map in [0,1] → (H,W,3) uint8 jet overlay (NaN drawn as grey)."""
    h = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.5).clip(0, 1)
    colour = colormaps["jet"](h)[..., :3]
    out = (1 - alpha) * (np.asarray(image, dtype=np.float32) / 255.0) + alpha * colour
    return (out.clip(0, 1) * 255).astype(np.uint8)
