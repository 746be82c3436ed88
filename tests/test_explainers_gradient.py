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


def nib_mfaba_vision(clip, pixels, text_features, steps=10):
    """NIB ``mfaba_vision`` re-done on the native open_clip modules, one image at a time: sign steps
    of 0.01 on ``get_hs`` (patches + CLS + positions, BEFORE ln_pre) down cos(f_I, f_T);
    attribution −Σ Δhs ⊙ g, nansum over D, CLS dropped."""
    import open_clip

    v = clip.visual
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    maps = []
    for i in range(pixels.shape[0]):
        with torch.no_grad():
            p = v.conv1((pixels[i : i + 1] - mean) / std).flatten(2).transpose(1, 2)
            hs = torch.cat([v.class_embedding.expand(1, 1, -1), p], dim=1) + v.positional_embedding
        attr = torch.zeros_like(hs)
        for _ in range(steps):
            hs = hs.detach().requires_grad_(True)
            feats = v.ln_post(v.transformer(v.ln_pre(hs))[:, 0]) @ v.proj
            loss = torch.nn.functional.cosine_similarity(feats, text_features[i : i + 1]).mean()
            (g,) = torch.autograd.grad(loss, [hs])
            nxt = hs.detach() - 0.01 * g.sign()
            attr -= (nxt - hs.detach()) * g
            hs = nxt
        maps.append(attr.nansum(-1)[0, 1:])
    return torch.stack(maps)


def test_mfaba_attention_image_is_nib(tiny, batch_for):
    """The default attention variant equals NIB's computation (path before the pre-LayerNorm)."""
    pixels, tokens, seeds = batch_for(tiny, 1)
    clip = tiny.model
    with torch.no_grad():
        text_features = clip.encode_text(tokens.ids)
    want = nib_mfaba_vision(clip, pixels, text_features, steps=4)
    got = MFABA(variant="attention", reduce="sum", steps=4)(tiny, pixels, tokens, seeds)
    assert torch.allclose(got.flatten(1), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_mfaba_text_is_nib_table_steps(tiny, batch_for):
    """Text = NIB ``mfaba_text``: sign steps of 0.01 on the token-embedding TABLE of a copy of the
    model, down the logit; a row's gradient sums all positions holding its id, so repeated words
    ("a", "cat" below) move together and get the same score."""
    import copy

    pixels, _, seeds = batch_for(tiny, 1)
    tokens = tiny.tokenize(["a cat on a mat with a cat"])
    clip = copy.deepcopy(tiny.model)
    table = clip.token_embedding.weight
    with torch.no_grad():
        image_features = tiny.encode_image(pixels)  # (native encode_image wants normalised pixels)
    ids = tokens.ids[0]
    attr = torch.zeros(ids.shape[0], table.shape[1])
    for _ in range(4):
        table.requires_grad_(True)
        logit = clip.logit_scale.exp() * (torch.nn.functional.normalize(clip.encode_text(tokens.ids), dim=-1)
                                          * image_features).sum()
        (g,) = torch.autograd.grad(logit, [table])
        with torch.no_grad():
            step = -0.01 * g.sign()
            attr -= step[ids] * g[ids]
            table.add_(step)
    want = attr.nansum(-1)
    got = MFABA(modality="text", variant="attention", reduce="sum", steps=4)(tiny, pixels, tokens, seeds)[0]
    got = got * clip.logit_scale.exp()
    real = tokens.attention_mask[0].bool()
    assert torch.allclose(got[real], want[real], rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert not got[~real].any()  # padding never moves
    words = ids[real].tolist()
    first = {w: words.index(w) for w in words}
    assert any(words.count(w) > 1 for w in words)
    assert all(got[i] == got[first[w]] for i, w in enumerate(words))


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
