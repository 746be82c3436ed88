"""X-Shift (perturbation=xshift), the perturbation twins folded beside it, and the noise controls' salts."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import SampleRng, text_target
from clip_xai.perturbations.base import Space, achieved_linf, box, mass_inside, project
from clip_xai.perturbations.noise import Noise
from clip_xai.perturbations.xshift import (
    XShift, box_mask, farthest_box, patch_similarity, random_box, region_mean, top_outside,
)
from tests.helpers import compose_cfg

EPS = 8 / 255
CLASSES = ["astronaut", "cat", "cup of coffee", "rocket", "horse"]


@pytest.fixture(scope="module")
def batch(tiny, sample_images):
    pixels, captions = sample_images
    return pixels, tiny.tokenize(list(captions)), torch.arange(4, dtype=torch.long) + 11


@contextlib.contextmanager
def native_tokens(visual):
    """open_clip's own forward returning its post-``ln_post`` tokens (the package's path is not used)."""
    visual.output_tokens = True
    try:
        yield
    finally:
        visual.output_tokens = False


def native_similarity(model, pixels, text):
    """(patch-text cosines (B,h,w), image-text cosine (B,)) from open_clip's native forward."""
    visual = model.model.visual
    with torch.no_grad(), native_tokens(visual):
        pooled, tokens = visual((pixels - model.vision.mean) / model.vision.std)
    dense = F.normalize(tokens @ visual.proj, dim=-1)
    h, w = model.grid
    c = (dense * text[:, None]).sum(-1).view(-1, h, w)
    return c, (F.normalize(pooled, dim=-1) * text).sum(-1)


def independent_top1(model, pixels, names, prompt="a photo of a {}"):
    with torch.no_grad():
        classes = model.encode_text(model.tokenize([prompt.format(n) for n in names]))
        return (model.encode_image(pixels) @ classes.T).argmax(1)


@pytest.fixture(scope="module")
def attacked(tiny, batch):
    """One dense and one sparse X-Shift run on four photos, with a class-prompt set."""
    pixels, tokens, seeds = batch
    dense = XShift(EPS, steps=4, classes=CLASSES)
    sparse = XShift(EPS, steps=4, sparsity=0.05, target="random_box", classes=None)
    for a in (dense, sparse):
        a.bind(None, tiny)
    return dense.perturb(tiny, pixels, tokens, seeds), sparse.perturb(tiny, pixels, tokens, seeds)


def test_budget_holds_and_the_sparse_variant_stays_on_its_support(tiny, batch, attacked):
    pixels, _, _ = batch
    dense, sparse = attacked
    for res in attacked:
        assert (achieved_linf(pixels, res.pixels) <= EPS + 1e-6).all()
        assert res.pixels.min() >= 0 and res.pixels.max() <= 1
    changed = (sparse.pixels != pixels).any(1).flatten(1).sum(1)  # pixel positions, any channel
    assert (changed <= round(0.05 * 224 * 224)).all()
    assert (dense.objective > 0).any(), "the attack found no admissible step on any photo"


def test_prediction_and_similarity_are_really_kept(tiny, batch, attacked):
    """Recomputed on open_clip's native forward and the public encoders, not the attack's own path."""
    pixels, tokens, _ = batch
    dense, _ = attacked
    text = text_target(tiny, tokens)
    _, s0 = native_similarity(tiny, pixels, text)
    _, s1 = native_similarity(tiny, dense.pixels, text)
    assert ((s1 - s0).abs() <= 0.01 + 1e-6).all()
    assert torch.equal(independent_top1(tiny, dense.pixels, CLASSES), independent_top1(tiny, pixels, CLASSES))


def test_the_gain_is_the_target_minus_object_shift_recomputed_natively(tiny, batch, attacked):
    pixels, tokens, seeds = batch
    dense, _ = attacked
    text = text_target(tiny, tokens)
    c0, _ = native_similarity(tiny, pixels, text)
    c1, _ = native_similarity(tiny, dense.pixels, text)
    attack = XShift(EPS, classes=None)
    with torch.no_grad():  # the regions from the attack's own clean map (ties must break as the attack's did)
        target, obj = attack.regions(patch_similarity(tiny, pixels, text)[0], seeds, None)
    gain = (region_mean(c1, target) - region_mean(c1, obj)) - (region_mean(c0, target) - region_mean(c0, obj))
    assert torch.allclose(gain, dense.objective, atol=1e-5)
    # the attack's own patch-similarity map gained mass in the target wherever it moved
    up = dense.objective > 0
    t_px = F.interpolate(target[:, None].float(), size=pixels.shape[-2:], mode="nearest")[:, 0] > 0.5
    assert torch.equal(t_px, dense.region)
    shift = lambda c: mass_inside(c - c.flatten(1).amin(1)[:, None, None], target)  # noqa: E731
    assert (shift(c1)[up] > shift(c0)[up]).all()


def test_moving_one_regions_patch_embeddings_toward_the_text_moves_the_map_there():
    """Hand-built: 4x4 patches with random unit embeddings; moving the bottom-right 2x2 patches'
    embeddings toward the text raises the patch-similarity map's mass there and lowers it elsewhere."""
    g = torch.Generator().manual_seed(0)
    e = F.normalize(torch.randn(1, 16, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(1, 8, generator=g), dim=-1)
    region = box_mask((4, 4), (2, 2), torch.tensor([2]), torch.tensor([2]))
    moved = e.clone()
    moved[:, region.flatten(1)[0]] = F.normalize(e[:, region.flatten(1)[0]] + 2.0 * t[:, None], dim=-1)

    def cmap(emb):
        c = (emb * t[:, None]).sum(-1).view(1, 4, 4)
        return c - c.min()

    before, after = mass_inside(cmap(e), region), mass_inside(cmap(moved), region)
    assert after.item() > before.item() + 0.2
    assert region_mean((moved * t[:, None]).sum(-1).view(1, 4, 4), region) > region_mean(
        (e * t[:, None]).sum(-1).view(1, 4, 4), region)


def test_regions_by_hand():
    c = torch.zeros(2, 6, 6)
    c[0, 0, 0] = 1.0  # peak top-left: farthest 2x2 box is bottom-right
    c[1, 5, 4] = 1.0  # peak bottom row: farthest box is at the top-left corner
    top, left = farthest_box(c, (2, 2))
    assert top.tolist() == [4, 0] and left.tolist() == [4, 0]
    target = box_mask((6, 6), (2, 2), top, left)
    assert target.sum((1, 2)).tolist() == [4, 4] and bool(target[0, 5, 5]) and bool(target[1, 0, 0])
    obj = top_outside(c, target, torch.tensor([4, 4]))
    assert bool(obj[0, 0, 0]) and not (obj & target).any() and obj.sum((1, 2)).tolist() == [4, 4]
    t1, l1 = random_box(torch.tensor([1, 2, 3]), (6, 6), (2, 2), "cpu")
    t2, l2 = random_box(torch.tensor([1, 2, 3]), (6, 6), (2, 2), "cpu")
    assert torch.equal(t1, t2) and torch.equal(l1, l2) and (t1 <= 4).all() and (l1 <= 4).all()


def test_seeded_runs_reproduce_and_zero_steps_or_eps_is_the_identity(tiny, batch):
    pixels, tokens, seeds = batch
    a = XShift(EPS, steps=2, target="random_box", classes=None)
    r1, r2 = a.perturb(tiny, pixels[:2], tokens.index(slice(0, 2)), seeds[:2]), \
        a.perturb(tiny, pixels[:2], tokens.index(slice(0, 2)), seeds[:2])
    assert torch.equal(r1.pixels, r2.pixels) and torch.equal(r1.region, r2.region)
    other = a.perturb(tiny, pixels[:2], tokens.index(slice(0, 2)), seeds[:2] + 100)
    assert not torch.equal(other.region, r1.region)  # the box follows the seed
    for zero in (XShift(EPS, steps=0, classes=None), XShift(0.0, steps=3, classes=None)):
        res = zero.perturb(tiny, pixels, tokens, seeds)
        assert torch.equal(res.pixels, pixels) and (res.objective == 0).all() and (res.clamped == 0).all()


def test_bad_settings_and_models_are_one_clear_error(tiny):
    from clip_xai.config import build

    for bad, word in [("perturbation.target=left", "target"), ("perturbation.region=1.5", "region"),
                      ("perturbation.sparsity=0", "sparsity"), ("perturbation.steps=-1", "steps"),
                      ("perturbation.max_sim_change=0", "max_sim_change"), ("perturbation.classes=[cat]", "classes"),
                      ("perturbation.prompt=photo", "prompt")]:
        with pytest.raises(ClipXaiError, match=word):
            build(compose_cfg(["perturbation=xshift", bad]), "perturbation")
    masked = XShift(EPS, target="mask_complement")

    class NoMasks:
        has_masks, classnames = False, None

    with pytest.raises(ClipXaiError, match="mask"):
        masked.bind_data(NoMasks())


def test_classes_auto_takes_the_datasets_names(tiny):
    class Named:
        has_masks, classnames = True, ["truck", "car", "plane"]

    a = XShift(EPS)
    assert a.class_embeddings(tiny) is None
    a.bind_data(Named())
    emb = a.class_embeddings(tiny)
    assert emb.shape[0] == 3 and a.params()["classes"] == ["truck", "car", "plane"]


def test_mask_complement_targets_the_patches_off_the_object(tiny, batch):
    pixels, tokens, seeds = batch
    masks = torch.zeros(4, 224, 224, dtype=torch.bool)
    masks[:, 64:160, 64:160] = True  # patches 4..9 of the 14x14 grid (16 px patches) are on the object
    res = XShift(EPS, steps=1, target="mask_complement", classes=None).perturb(
        tiny, pixels, tokens, seeds, masks)
    assert torch.equal(res.region, ~masks)


# --- the twins folded beside X-Shift ---------------------------------------------------------------


def test_space_gradient_is_the_chain_rule_in_both_spaces(tiny, batch):
    pixels, tokens, _ = batch
    text = text_target(tiny, tokens)
    for kind in ("pixel", "normalized"):
        space = Space(kind, tiny)
        z = space.to_space(pixels).detach().requires_grad_(True)
        s = (F.normalize(tiny.vision(space.to_pixels(z))[0], dim=-1) * text).sum(-1)
        (want,) = torch.autograd.grad(s.sum(), [z])
        got, s_got = space.gradient(tiny, space.to_space(pixels), text)
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-5) and torch.allclose(s_got, s.detach())


def test_project_is_the_ball_then_box():
    z0 = torch.tensor([[0.0, 0.5, 1.0, 0.98]])
    z = torch.tensor([[-0.3, 0.9, 1.2, 1.0]])
    got, share = project(z, z0, 0.1)
    assert torch.equal(got, torch.tensor([[0.0, 0.6, 1.0, 1.0]])) and share.item() == 0.5  # -0.1 and 1.1 clamped
    boxed, share = box(torch.tensor([[-0.1, 0.5, 1.5, 1.0]]))
    assert torch.equal(boxed, torch.tensor([[0.0, 0.5, 1.0, 1.0]])) and share.item() == 0.5


def test_sign_and_gaussian_controls_are_independent_draws(tiny, batch):
    _, tokens, _ = batch
    grey = torch.full((4, 3, 224, 224), 0.5)
    seeds = torch.arange(4, dtype=torch.long)
    sign = Noise(EPS, kind="sign")(tiny, grey, tokens, seeds) - grey
    gauss = Noise(EPS, kind="gaussian")(tiny, grey, tokens, seeds) - grey
    agree = (sign.sign() == gauss.sign()).float().mean().item()
    assert abs(agree - 0.5) < 0.01  # independent: half the signs agree (one draw: all of them did)
    # neither replays the explainer's per-sample normal draws
    assert not torch.equal(sign.sign(), SampleRng(seeds, "cpu").normal(3, 224, 224).sign())
