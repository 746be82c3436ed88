"""ABM and M2IB (METHODS.md §2.8, §2.13) against quantities recomputed here from the engine."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip_xai.explainers.abm import ABM
from clip_xai.explainers.bottleneck import capacity
from clip_xai.explainers.m2ib import M2IB

LAYER = 9


@pytest.fixture()
def model(any_model):
    """Each backend in turn (conftest's ``any_model``)."""
    return any_model


def hidden_before(model, modality, pixels, tokens, block):
    """Hidden state entering ``block`` of the explained tower, recomputed independently."""
    tower = model.vision if modality == "image" else model.text
    inputs = pixels if modality == "image" else tokens
    with torch.no_grad():
        x, bias = tower.embed(inputs)
        z, _ = tower.run(x, bias, stop=block)
    return z.float()


def no_bottleneck_scores(z, log_var=math.log(1e-9)):
    """λ = 1 ⇒ μ = z, σ² = 0: per element ½(z² − 1 − log σ²), with log σ² = log 1e−9 (ABM) or
    log of the smallest normal float (M2IB's exact log) (z = 0 elements dropped, as nansum)."""
    per_el = 0.5 * (z ** 2 - 1 - log_var)
    return per_el.masked_fill(z == 0, 0).sum(-1)


# ----------------------------------------------------------------------------------------- ABM


def test_capacity_formula():
    mu, var = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 0.25, 0.0])
    expect = 0.5 * (mu ** 2 + var - 1 - torch.log(var + 1e-9))
    assert torch.allclose(capacity(mu, var), expect)
    assert capacity(torch.zeros(1), torch.ones(1)).abs().item() < 1e-6  # N(0,1) vs N(0,1): KL 0


def test_abm_iterates_stay_between_zero_and_z(tiny, batch_for):
    pixels, tokens, seeds = batch_for(tiny)
    abm = ABM(steps=4, noise_samples=2, record_path=True)
    abm(tiny, pixels, tokens, seeds)
    z = hidden_before(tiny, "image", pixels, tokens, LAYER)
    assert torch.equal(abm.debug["z"], z)
    path = abm.debug["path"]
    assert len(path) == 5 and torch.equal(path[0], z)
    lo, hi = z.clamp(max=0), z.clamp(min=0)
    for x in path:
        assert bool(((x >= lo) & (x <= hi)).all())
    assert not torch.equal(path[-1], z)  # it moved


@pytest.mark.parametrize("modality", ["image", "text"])
def test_abm_raises_expected_similarity(tiny, batch_for, modality):
    """E_ε cos(f(z̃), e_other) at the last iterate exceeds its value at x⁰ = z (where z̃ = z)."""
    pixels, tokens, seeds = batch_for(tiny)
    abm = ABM(modality=modality, steps=4, noise_samples=4, record_path=True)
    abm(tiny, pixels, tokens, seeds)
    z, path = abm.debug["z"], abm.debug["path"]
    tower = tiny.vision if modality == "image" else tiny.text
    inputs = pixels if modality == "image" else tokens
    target = tiny.encode_text(tokens) if modality == "image" else tiny.encode_image(pixels)
    with torch.no_grad():
        _, bias = tower.embed(inputs)

        def expected_cos(x, draws):
            gen = torch.Generator().manual_seed(123)
            sims = []
            for _ in range(draws):
                zt = x + (1 - x / z) * torch.randn(x.shape, generator=gen)
                out, _ = tower.run(zt, bias, start=LAYER)
                sims.append((F.normalize(tower.pool(out, inputs), dim=-1) * target).sum(-1))
            return torch.stack(sims).mean(0)

        first, last = expected_cos(path[0], 1), expected_cos(path[-1], 16)
    assert bool((last > first + 0.05).all()), (first, last)


def test_abm_zero_steps_is_the_no_bottleneck_map(tiny, batch_for):
    """T = 0: x = z, λ = 1, μ= z, σ² = 0 — nothing removed. With the log-variance ε this is NOT a
    zero map: every element scores the capped point-mass KL ½(z² − 1 − log 1e−9), so the map is
    that closed form summed over channels (a function of z alone, independent of the seed)."""
    pixels, tokens, seeds = batch_for(tiny)
    got = ABM(steps=0)(tiny, pixels, tokens, seeds)
    z = hidden_before(tiny, "image", pixels, tokens, LAYER)
    assert torch.allclose(got, tiny.patch_map(no_bottleneck_scores(z)), rtol=1e-5)
    assert torch.equal(got, ABM(steps=0)(tiny, pixels, tokens, seeds + 100))


def test_abm_deterministic_and_batch_independent(tiny, batch_for):
    pixels, tokens, seeds = batch_for(tiny)
    abm = ABM(steps=3, noise_samples=2)
    abm.cpu_micro_batch = None  # the real batched path
    both = abm(tiny, pixels, tokens, seeds)
    assert both.shape == (2, *tiny.grid) and torch.isfinite(both).all()
    assert torch.equal(both, abm(tiny, pixels, tokens, seeds))
    assert not torch.equal(both, abm(tiny, pixels, tokens, seeds + 1))
    singles = torch.cat([abm(tiny, pixels[i : i + 1], tokens.index(slice(i, i + 1)), seeds[i : i + 1]) for i in range(2)])
    assert torch.allclose(both, singles, rtol=1e-4, atol=1e-4)


def test_abm_text_pins_non_caption_tokens(model, batch_for):
    pixels, tokens, seeds = batch_for(model)
    got = ABM(modality="text", steps=2, noise_samples=2)(model, pixels, tokens, seeds)
    assert got.shape == tokens.ids.shape and torch.isfinite(got).all()
    z = hidden_before(model, "text", pixels, tokens, LAYER)
    outside = ~tokens.content_mask
    assert torch.allclose(got[outside], no_bottleneck_scores(z)[outside], rtol=1e-5)


def test_abm_image_shape(model, batch_for):
    pixels, tokens, seeds = batch_for(model)
    got = ABM(steps=2, noise_samples=2)(model, pixels, tokens, seeds)
    assert got.shape == (2, *model.grid) and torch.isfinite(got).all()


# ---------------------------------------------------------------------------------------- M2IB


@pytest.mark.parametrize("modality", ["image", "text"])
def test_m2ib_lambda_one_leaves_embedding_unchanged(model, batch_for, modality):
    pixels, tokens, seeds = batch_for(model)
    m2ib = M2IB(modality=modality, copies=3)
    emb = m2ib.bottleneck_embeddings(model, pixels, tokens, seeds, lam=1.0)
    with torch.no_grad():
        clean = model.encode_image(pixels) if modality == "image" else model.encode_text(tokens)
    assert emb.shape == (2, 3, clean.shape[-1])
    assert torch.allclose(emb, clean[:, None].expand_as(emb), atol=1e-5)
    noisy = m2ib.bottleneck_embeddings(model, pixels, tokens, seeds, lam=0.5)
    assert not torch.allclose(noisy, emb, atol=1e-3)  # the hook really acts


def test_m2ib_lambda_override_map(tiny, batch_for):
    """λ fixed to 1: μ = h (output of block 9), σ² = 0, the closed-form no-bottleneck map."""
    pixels, tokens, seeds = batch_for(tiny)
    got = M2IB(lambda_override=1.0)(tiny, pixels, tokens, seeds)
    h = hidden_before(tiny, "image", pixels, tokens, LAYER + 1)
    floor = math.log(torch.finfo(torch.float32).tiny)  # σ² = 0 floored: M2IB's exact log stays finite
    assert torch.allclose(got, tiny.patch_map(no_bottleneck_scores(h, floor)), rtol=1e-5)


def m2ib_reference_text(clip, ids, image_features, seed, layer=9, beta=0.1, steps=10, lr=1.0, copies=10):
    """YingWANGG/M2IB ``text_heatmap_iba`` re-done on the native open_clip text modules with the
    UNPADDED ids: α (1, L, D) = 5, λ = σ(α); block ``layer``'s output h → λh + (1−λ)ε for
    ``copies`` rows; loss β·mean(capacity over all L·D) − mean cos; Adam(lr); the map is the last
    forward's capacity (exact log σ²), mean over copies, nansum over D. ε follows clip_xai's noise
    contract (per-sample generator, (copies, L, D) per step) so both see the same draws."""
    n = ids.shape[1]
    mask = clip.attn_mask[:n, :n]
    blocks = clip.transformer.resblocks
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding[:n]
        for blk in blocks[: layer + 1]:
            x = blk(x, attn_mask=mask)
    h = x.expand(copies, -1, -1)
    alpha = torch.full((1, *x.shape[1:]), 5.0, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        lam = torch.sigmoid(alpha).expand(copies, -1, -1)
        mu, var = h * lam, (1 - lam) ** 2
        cap = -0.5 * (1 + torch.log(var) - mu ** 2 - var)
        t = mu + var.sqrt() * torch.randn(h.shape, generator=gen)
        for blk in blocks[layer + 1 :]:
            t = blk(t, attn_mask=mask)
        feats = clip.ln_final(t[:, ids[0].argmax()]) @ clip.text_projection
        cos = F.cosine_similarity(feats, image_features.expand(copies, -1), eps=1e-6)
        loss = beta * cap.mean() - cos.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cap.detach().mean(0).nansum(-1)


def test_m2ib_text_is_the_reference_on_unpadded_ids(tiny, batch_for):
    """The M2IB text map on ids padded to 77 equals the reference's computation on the unpadded
    ids (reference settings; 3 noise copies instead of 10 to keep the test cheap): the capacity mean runs over the real tokens only (averaging over 77 positions
    made β ~10× weaker on a short caption)."""
    pixels, tokens, seeds = batch_for(tiny, 1)
    length = int(tokens.pool_index[0]) + 1
    image_features = tiny.encode_image(pixels)
    want = m2ib_reference_text(tiny.model, tokens.ids[:, :length], image_features, int(seeds[0]), copies=3)
    got = M2IB(modality="text", copies=3)(tiny, pixels, tokens, seeds)[0]  # reference steps, β, lr
    assert torch.allclose(got[:length], want, rtol=1e-4), (got[:length], want)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_m2ib_shapes_and_determinism(model, batch_for, modality):
    pixels, tokens, seeds = batch_for(model)
    m2ib = M2IB(modality=modality, steps=2, copies=2)
    got = m2ib(model, pixels, tokens, seeds)
    shape = (2, *model.grid) if modality == "image" else tokens.ids.shape
    assert got.shape == shape and torch.isfinite(got).all()
    assert torch.equal(got, m2ib(model, pixels, tokens, seeds))


def test_m2ib_batch_independent_and_training_changes_map(tiny, batch_for):
    pixels, tokens, seeds = batch_for(tiny)
    m2ib = M2IB(steps=2, copies=2)
    m2ib.cpu_micro_batch = None  # the real batched path
    both = m2ib(tiny, pixels, tokens, seeds)
    singles = torch.cat([m2ib(tiny, pixels[i : i + 1], tokens.index(slice(i, i + 1)), seeds[i : i + 1]) for i in range(2)])
    assert torch.allclose(both, singles, rtol=1e-4, atol=1e-4)
    untrained = M2IB(steps=0)(tiny, pixels, tokens, seeds)
    assert not torch.allclose(both, untrained)


@pytest.mark.parametrize("make", [lambda: M2IB(steps=2, copies=2), lambda: ABM(steps=2, noise_samples=2)])
def test_cpu_micro_batches_give_the_whole_batch_maps(tiny, batch_for, make):
    pixels, tokens, seeds = batch_for(tiny, 4)
    explainer = make()
    explainer.cpu_micro_batch = None
    whole = explainer(tiny, pixels, tokens, seeds)
    explainer.cpu_micro_batch = 3  # split 3 + 1
    assert torch.allclose(explainer(tiny, pixels, tokens, seeds), whole, rtol=1e-4, atol=1e-4)


def test_abm_per_draw_is_a_loop_of_separate_backward_passes(tiny, batch_for):
    """``grad_accumulation: per_draw`` = the reference's accumulation: per step, one forward and
    one backward pass per noise draw, the gradients summed in draw order (here by ``backward()``
    accumulating into ``x.grad``), then the sign."""
    pixels, tokens, seeds = batch_for(tiny, 1)
    steps, k = 3, 3
    abm = ABM(steps=steps, noise_samples=k, grad_accumulation="per_draw", record_path=True)
    abm(tiny, pixels, tokens, seeds)
    tower, target = tiny.vision, tiny.encode_text(tokens)
    z = hidden_before(tiny, "image", pixels, tokens, LAYER)
    gen = torch.Generator().manual_seed(int(seeds[0]))  # the per-sample noise stream (SampleRng)
    x, want = z.clone(), [z]
    for _ in range(steps):
        lam = x / z
        eps = torch.randn((k, *z.shape[1:]), generator=gen)
        x = x.detach().requires_grad_(True)
        for j in range(k):
            with torch.enable_grad():
                out, _ = tower.run(x + (1 - lam) * eps[j], None, start=LAYER)
                (F.normalize(tower.pool(out), dim=-1) * target).sum().backward()
        x = torch.clamp(x.detach() + z.abs() / steps * x.grad.sign(), z.clamp(max=0), z.clamp(min=0))
        want.append(x)
    assert all(torch.equal(a, b) for a, b in zip(abm.debug["path"], want))


def test_abm_bad_accumulation_is_a_user_error():
    from clip_xai.errors import ClipXaiError

    with pytest.raises(ClipXaiError, match="grad_accumulation"):
        ABM(grad_accumulation="sequential")
