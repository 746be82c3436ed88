"""Saliency, FastIG, MFABA (METHODS.md §2.10–2.12) against autograd recomputed in the test."""
from __future__ import annotations

import pytest
import torch

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.fastig import FastIG
from clip_xai.explainers.mfaba import MFABA
from clip_xai.explainers.saliency import Saliency


@pytest.fixture()
def model(any_model):
    """Each backend in turn (conftest's ``any_model``)."""
    return any_model


def pixel_grad(model, pixels, tokens):
    """∂cos(f_I(x), f_T)/∂x through the adapter's public encoders only."""
    x = pixels.clone().requires_grad_(True)
    with torch.no_grad():
        t = model.encode_text(tokens)
    s = (model.encode_image(x) * t).sum()
    (g,) = torch.autograd.grad(s, [x])
    return g


def test_saliency_pixel_is_abs_gradient_reduced(tiny, batch_for):
    pixels, tokens, seeds = batch_for(tiny)
    g = pixel_grad(tiny, pixels, tokens)
    assert torch.allclose(Saliency()(tiny, pixels, tokens, seeds), g.abs().mean(1), rtol=1e-4, atol=1e-9)
    assert torch.allclose(Saliency(reduce="max")(tiny, pixels, tokens, seeds), g.abs().amax(1), rtol=1e-4, atol=1e-9)


def test_fastig_pixel_is_input_times_gradient(tiny, batch_for):
    pixels, tokens, seeds = batch_for(tiny)
    g = pixel_grad(tiny, pixels, tokens)
    got = FastIG(reduce="sum")(tiny, pixels, tokens, seeds)
    assert torch.allclose(got, (pixels * g).sum(1), rtol=1e-4, atol=1e-9)


def test_attention_variants_match_recorded_gradient(tiny, batch_for):
    pixels, tokens, seeds = batch_for(tiny)
    tower = tiny.vision
    last = tower.n_layers - 1
    with torch.enable_grad():
        x = pixels.clone().requires_grad_(True)
        emb, rec = tower(x, record=(last,))
        s = (torch.nn.functional.normalize(emb, dim=-1) * tiny.encode_text(tokens)).sum()
        probs = rec[last].probs
        (g,) = torch.autograd.grad(s, [probs])
    sal = Saliency(variant="attention")(tiny, pixels, tokens, seeds)
    fig = FastIG(variant="attention")(tiny, pixels, tokens, seeds)
    assert torch.allclose(sal, tiny.patch_map(g.abs()[:, :, 0].mean(1)), rtol=1e-4, atol=1e-10)
    assert torch.allclose(fig, tiny.patch_map((probs * g)[:, :, 0].mean(1)), rtol=1e-4, atol=1e-12)


def test_mfaba_two_step_path(tiny, batch_for):
    """Attribution = −Σ_t (x_{t+1} − x_t) ⊙ g_t on x_{t+1} = clip(x_t − 0.1 g_t/‖g_t‖₂, 0, 1)."""
    pixels, tokens, seeds = batch_for(tiny)
    x, attr = pixels.clone(), torch.zeros_like(pixels)
    for _ in range(2):
        g = pixel_grad(tiny, x, tokens)
        nxt = (x - 0.1 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
        attr -= (nxt - x) * g
        x = nxt
    got = MFABA(steps=2)(tiny, pixels, tokens, seeds)
    assert torch.allclose(got, attr.mean(1), rtol=1e-3, atol=1e-12)


def test_mfaba_embedding_two_step_path_text(tiny, batch_for):
    """Text (NIB): sign steps of 0.01 down the similarity on the token-embedding output."""
    pixels, tokens, seeds = batch_for(tiny)
    with torch.no_grad():
        e, bias = tiny.text.embed(tokens)
        img = tiny.encode_image(pixels)
    attr = torch.zeros_like(e)
    for _ in range(2):
        with torch.enable_grad():
            e = e.detach().requires_grad_(True)
            out, _ = tiny.text.run(e, bias)
            s = (torch.nn.functional.normalize(tiny.text.pool(out, tokens), dim=-1) * img).sum()
            (g,) = torch.autograd.grad(s, [e])
        nxt = e.detach() - 0.01 * g.sign()
        attr -= (nxt - e.detach()) * g
        e = nxt
    got = MFABA(modality="text", steps=2, reduce="sum")(tiny, pixels, tokens, seeds)
    assert torch.allclose(got, attr.sum(-1), rtol=1e-3, atol=1e-9)


CASES = [
    (Saliency, {"variant": "pixel"}), (Saliency, {"variant": "attention"}),
    (FastIG, {"variant": "pixel"}), (FastIG, {"variant": "attention"}),
    (MFABA, {"variant": "pixel", "steps": 2}), (MFABA, {"variant": "attention", "steps": 2}),
]


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("cls,kw", CASES, ids=lambda v: getattr(v, "__name__", None) or v.get("variant"))
def test_shapes_finite_deterministic(model, batch_for, cls, kw, modality):
    pixels, tokens, seeds = batch_for(model)
    explainer = cls(modality=modality, **kw)
    got = explainer(model, pixels, tokens, seeds)
    if modality == "text":
        shape = tokens.ids.shape
    elif kw["variant"] == "pixel":
        shape = pixels.shape[:1] + pixels.shape[2:]
    else:
        shape = (2, *model.grid)
    assert got.shape == shape and torch.isfinite(got).all()
    assert got.abs().sum() > 0
    assert torch.equal(got, explainer(model, pixels, tokens, seeds))


def test_bad_choices_are_user_errors():
    with pytest.raises(ClipXaiError):
        Saliency(variant="nope")
    with pytest.raises(ClipXaiError):
        FastIG(reduce="median")
    with pytest.raises(ClipXaiError):
        MFABA(update="adam")
