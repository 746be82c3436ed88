"""GEM (clip_xai/explainers/gem.py): maps re-derived by hand on the tiny open_clip model from a
forward written here, contracts on every backend, settings, double backpropagation, and both
studies through the real entrypoint. Parity with the authors' package (gem-torch 1.0.1) is measured
outside the test suite; the numbers are in the docs' parity table."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from clip_xai.config import build
from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import keep_graph
from clip_xai.explainers.gem import GEM
from tests.helpers import run_cli

CONF = Path(__file__).resolve().parents[1] / "conf" / "explainer"
TOL = 1e-5


def _close(a: Tensor, b: Tensor, tol: float = TOL) -> bool:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() <= tol * scale


def _hand_gem(tiny, pixels: Tensor, tokens, layers: int, iterations: int, temperature: float | None) -> Tensor:
    """The GEM path written out from the native open_clip weights (CVPR 2024, Sec. 3)."""
    visual = tiny.model.visual
    with torch.no_grad():
        txt = F.normalize(tiny.model.encode_text(tokens.ids), dim=-1)
        x = visual.conv1((pixels - tiny.vision.mean) / tiny.vision.std).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        blocks = list(visual.transformer.resblocks)
        x_gem = None
        for i, block in enumerate(blocks):
            if i == len(blocks) - layers:
                x_gem = x
            attn, nh = block.attn, block.attn.num_heads
            h = block.ln_1(x)
            q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            b, n, d = q.shape
            qh, kh, vh = (t.reshape(b, n, nh, d // nh).permute(0, 2, 1, 3) for t in (q, k, v))
            if x_gem is not None:
                tau = (h.norm(dim=-1).mean(dim=-1) / math.sqrt(d // nh) if temperature is None
                       else torch.full((b,), temperature))[:, None, None, None]
                ctx = 0
                for p in (qh, kh, vh):
                    for _ in range(iterations):
                        pn = p / p.norm(dim=-1, keepdim=True)
                        p = torch.softmax(tau * torch.einsum("bhid,bhjd->bhij", pn, pn), dim=-1) @ pn
                    pn = p / p.norm(dim=-1, keepdim=True)
                    ctx = ctx + torch.softmax(tau * torch.einsum("bhid,bhjd->bhij", pn, pn), dim=-1) @ vh / 3
                x_gem = x_gem + attn.out_proj(ctx.permute(0, 2, 1, 3).reshape(b, n, d))
            probs = torch.softmax(torch.einsum("bhid,bhjd->bhij", qh, kh) / math.sqrt(d // nh), dim=-1)
            x = x + attn.out_proj((probs @ vh).permute(0, 2, 1, 3).reshape(b, n, d))
            x = x + block.mlp(block.ln_2(x))
        dense = visual.ln_post(x_gem) @ visual.proj
        cos = F.cosine_similarity(dense, txt[:, None, :], dim=-1)
    return cos[:, 1:].reshape(-1, 14, 14)


@pytest.fixture(scope="module")
def pair(tiny, sample_images):
    pixels, captions = sample_images
    return pixels[:2], tiny.tokenize(list(captions[:2]))


@pytest.mark.parametrize("layers,iterations,temperature", [(6, 1, None), (1, 0, None), (12, 3, None), (6, 1, 2.5)])
def test_maps_by_hand(tiny, pair, layers, iterations, temperature):
    pixels, tokens = pair
    expected = _hand_gem(tiny, pixels, tokens, layers, iterations, temperature)
    got = GEM(layers=layers, iterations=iterations, temperature=temperature)(tiny, pixels, tokens)
    assert got.shape == (2, 14, 14) and expected.abs().max() > 0
    assert _close(got, expected)
    assert got.abs().max() <= 1 + 1e-6  # a cosine per patch


def test_contract(any_model, batch_for):
    pixels, tokens, seeds = batch_for(any_model, 2)
    explainer = GEM()
    maps = explainer(any_model, pixels, tokens, seeds)
    assert tuple(maps.shape) == (2, *any_model.grid) and torch.isfinite(maps).all() and not maps.requires_grad
    assert (maps.flatten(1).amax(1) > maps.flatten(1).amin(1)).all(), "an image map is constant"
    for i in range(2):
        single = explainer(any_model, pixels[i:i + 1], tokens.index(slice(i, i + 1)), seeds[i:i + 1])
        assert _close(single[0], maps[i]), f"sample {i} depends on its batch mate"


def test_yaml_defaults_and_settings(tiny, pair):
    built = build(OmegaConf.create({"explainer": OmegaConf.load(CONF / "gem.yaml")}), "explainer")
    assert type(built) is GEM and built.config_key() == GEM().config_key()
    assert (GEM().layers, GEM().iterations, GEM().temperature) == (6, 1, None)  # the package's defaults
    for bad in ({"layers": 0}, {"iterations": -1}, {"temperature": 0.0}, {"modality": "text"}):
        with pytest.raises(ClipXaiError):
            GEM(**bad)
    pixels, tokens = pair
    with pytest.raises(ClipXaiError, match="last 13 blocks"):
        GEM(layers=13)(tiny, pixels, tokens)
    assert GEM().requirements() == {"blocks", "attention", "token_head"}


def test_differentiable_map(tiny, pair):
    assert GEM.differentiable
    pixels, tokens = pair
    plain = GEM()(tiny, pixels[:1], tokens.index(slice(0, 1)))
    x = pixels[:1].clone().requires_grad_(True)
    with keep_graph():
        m = GEM().explain(tiny, x, tokens.index(slice(0, 1)), torch.zeros(1, dtype=torch.long))
    assert torch.allclose(m.detach(), plain, rtol=1e-5, atol=1e-7)
    (g,) = torch.autograd.grad(m.square().sum(), [x])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.slow
def test_entrypoint_both_studies(tmp_path):
    res = run_cli(["-m", "model=tiny", "dataset=sample", "dataset.limit=2", "explainer=gem",
                   "study=sensitivity,faithfulness", "logger=none", "name=gem", f"output_root={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    df = pd.concat([pd.read_parquet(p) for p in (tmp_path / "gem").rglob("results.parquet")], ignore_index=True)
    sens, faith = df[df.study == "sensitivity"], df[df.study == "faithfulness"]
    assert len(sens) == len(faith) == 2 and sens["spearman"].notna().all()
    assert faith["conf_drop_image"].notna().all() and faith["road"].notna().all() and faith["conf_drop_text"].isna().all()
