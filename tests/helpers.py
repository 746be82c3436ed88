"""Test helpers: compose configs in-process and run the real entrypoint as a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from clip_xai.paths import CONF_DIR
from clip_xai.config import register_resolvers

REPO = Path(__file__).resolve().parents[1]


def compose_cfg(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_cli(args: list[str], timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m clip_xai`` with ``args``; WANDB offline, one thread, text output."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "clip_xai", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout, **kwargs)


def varies(values, rtol: float = 1e-4) -> bool:
    """True when ``values`` are not constant beyond float32 rounding: their span (max − min)
    exceeds ``rtol`` times their largest magnitude. A map that is constant in exact arithmetic
    still carries rounding noise of about 1e-7 of its magnitude, which ``span > 0`` or
    ``std() > 0`` accept; ``rtol`` = 1e-4 sits three decades above that noise."""
    values = values.detach().double().flatten()
    scale = values.abs().max().item()
    return scale > 0 and (values.max() - values.min()).item() > rtol * scale


def hf_normalised(adapter, pixels):
    """[0,1] pixels as a transformers vision model takes them (the adapter's own mean/std)."""
    return (pixels - adapter.vision.mean) / adapter.vision.std


def native_hf_tower(adapter, kind: str, inputs):
    """(projected embedding, last block's attention probabilities) from transformers' own forward of an
    HF-backed adapter (CLIPModel or AltCLIPModel: the same vision/text/projection attributes)."""
    m = adapter.model
    if kind == "vision":
        out = m.vision_model(pixel_values=hf_normalised(adapter, inputs), output_attentions=True)
        return m.visual_projection(out.pooler_output), out.attentions[-1]
    out = m.text_model(input_ids=inputs.ids, attention_mask=inputs.attention_mask, output_attentions=True)
    return m.text_projection(out.pooler_output), out.attentions[-1]


def recorded_and_native_grads(adapter, kind: str, target: str, pixels, tokens, table, mask_padded_queries=False):
    """Gradients of one seeded random weighting of the embedding (``target="embedding"``) or of the
    last block's attention (``"probs"``), through the adapter's recorded path and through
    transformers' native forward: at the pixels (vision) or at the word-embedding ``table`` (text).
    ``mask_padded_queries`` zeroes the text weights of padded query rows (masked differently by HF CLIP)."""
    import torch

    tower = adapter.vision if kind == "vision" else adapter.text
    grads = []
    for path in ("recorded", "native"):
        leaf = pixels.clone().requires_grad_(True) if kind == "vision" else table
        inp = leaf if kind == "vision" else tokens
        table.requires_grad_(kind == "text")  # the adapter freezes its weights
        try:
            if path == "recorded":
                emb, recs = tower(inp, record=(-1,))
                probs = recs[tower.n_layers - 1].probs
            else:
                emb, probs = native_hf_tower(adapter, kind, inp)
            out = emb if target == "embedding" else probs
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
            if mask_padded_queries and kind == "text" and target == "probs":
                weights = weights * tokens.attention_mask[:, None, :, None]
            (grad,) = torch.autograd.grad((out * weights).sum(), leaf)
        finally:
            table.requires_grad_(False)
        grads.append(grad)
    return grads
