"""The perturbation group: FGSM (pixel and the thesis's normalised space), PGD, noise controls, map attack."""
from __future__ import annotations

import pytest
import torch
from scipy import stats

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import SampleRng, cosine, keep_graph, text_target
from clip_xai.explainers.gradcam import GradCAM
from clip_xai.explainers.rise import RISE
from clip_xai.perturbations.base import achieved_linf
from clip_xai.perturbations.fgsm import FGSM
from clip_xai.perturbations.map_attack import MapAttack, differentiable_explainers, mass_map, softplus_activations
from clip_xai.perturbations.noise import Noise
from clip_xai.perturbations.pgd import PGD
from tests.helpers import compose_cfg

EPS = 8 / 255


@pytest.fixture(scope="module")
def batch(tiny, sample_images):
    """Four real photos on the tiny model: (pixels, tokens, seeds)."""
    pixels, captions = sample_images
    return pixels, tiny.tokenize(list(captions)), torch.arange(4, dtype=torch.long) + 3


def similarity(model, pixels, tokens):
    with torch.no_grad():
        return cosine(model.vision(pixels)[0], text_target(model, tokens))


def hand_gradient(model, z, tokens, to_pixels):
    """∂cos/∂z through an explicit autograd graph, written independently of the package."""
    z = z.detach().clone().requires_grad_(True)
    emb = model.vision(to_pixels(z))[0]
    s = (torch.nn.functional.normalize(emb, dim=-1) * text_target(model, tokens)).sum(-1)
    (g,) = torch.autograd.grad(s.sum(), [z])
    return g


def test_fgsm_pixel_space_is_the_hand_formula(tiny, batch):
    pixels, tokens, seeds = batch
    g = hand_gradient(tiny, pixels, tokens, lambda z: z)
    want = (pixels + EPS * g.sign()).clamp(0, 1)
    got = FGSM(EPS).perturb(tiny, pixels, tokens, seeds)
    assert torch.allclose(got.pixels, want, atol=1e-7)
    assert (achieved_linf(pixels, got.pixels) <= EPS + 1e-6).all()
    down = FGSM(EPS, direction="decrease")(tiny, pixels, tokens)
    assert torch.allclose(down, (pixels - EPS * g.sign()).clamp(0, 1), atol=1e-7)


def test_fgsm_normalized_space_reproduces_the_thesis(tiny, batch):
    """The thesis: step and clamp the CLIP-normalised tensor, map back to pixels (issue 11, item 6)."""
    pixels, tokens, seeds = batch
    mean, std = tiny.vision.mean, tiny.vision.std
    z = (pixels - mean) / std
    g = hand_gradient(tiny, z, tokens, lambda v: v * std + mean)
    stepped = z + EPS * g.sign()
    want = stepped.clamp(0, 1) * std + mean
    got = FGSM(EPS, space="normalized").perturb(tiny, pixels, tokens, seeds)
    assert torch.allclose(got.pixels, want, atol=1e-6)
    # the share the clamp changed: values stepped outside [0, 1]
    share = ((stepped < 0) | (stepped > 1)).flatten(1).float().mean(1)
    assert torch.allclose(got.clamped, share)
    # its pixel step is eps*std (~0.27 eps) where nothing is clamped, and the clamp moves pixels far beyond eps
    free = (stepped >= 0) & (stepped <= 1)
    step = (got.pixels - pixels).abs()
    assert torch.allclose(step[free.expand_as(step)], (EPS * std).expand_as(step)[free.expand_as(step)], atol=1e-6)
    assert (achieved_linf(pixels, got.pixels) > 5 * EPS).all()
    assert FGSM(EPS, space="normalized").linf_bound is None and FGSM(EPS).linf_bound == EPS


@pytest.mark.parametrize("space", ["pixel", "normalized"])
@pytest.mark.parametrize("direction", ["increase", "decrease"])
def test_pgd_one_step_without_random_start_is_fgsm_bit_for_bit(tiny, batch, space, direction):
    pixels, tokens, seeds = batch
    f = FGSM(EPS, direction=direction, space=space).perturb(tiny, pixels, tokens, seeds)
    p = PGD(EPS, steps=1, random_start=False, direction=direction, space=space).perturb(tiny, pixels, tokens, seeds)
    assert torch.equal(f.pixels, p.pixels)
    assert torch.equal(f.clamped, p.clamped)


def test_pgd_raises_similarity_at_least_as_much_as_fgsm(tiny, batch):
    """Over images × ε × random starts (seeds), PGD's mean similarity gain is at least FGSM's."""
    pixels, tokens, seeds = batch
    s0 = similarity(tiny, pixels, tokens)
    gains_f, gains_p = [], []
    for eps in (4 / 255, 8 / 255):
        gain_f = similarity(tiny, FGSM(eps)(tiny, pixels, tokens), tokens) - s0
        for start, shift in ((False, 0), (True, 0), (True, 100)):
            x = PGD(eps, steps=4, random_start=start)(tiny, pixels, tokens, seeds + shift)
            assert (achieved_linf(pixels, x) <= eps + 1e-6).all()
            gains_p.append(similarity(tiny, x, tokens) - s0)
            gains_f.append(gain_f)  # paired: same images and eps
    gain_p, gain_f = torch.cat(gains_p), torch.cat(gains_f)
    assert gain_p.mean() >= gain_f.mean() > 0


def test_noise_is_seeded_batch_independent_and_symmetric(tiny, batch):
    pixels, tokens, seeds = batch
    grey = torch.full((8, 3, 224, 224), 0.5)  # no clamp: the noise is the change itself
    many = torch.arange(8, dtype=torch.long)
    for kind in ("sign", "gaussian"):
        pert = Noise(EPS, kind=kind)
        a, b = pert(tiny, grey, tokens, many), pert(tiny, grey, tokens, many)
        assert torch.equal(a, b)  # reproducible from the seed
        assert torch.equal(pert(tiny, grey[3:4], tokens, many[3:4]), a[3:4])  # whatever the batch
        assert not torch.equal(a[0], a[1])  # samples differ
        n = (a - grey).flatten()
        assert n.abs().max() <= EPS + 1e-7
        if kind == "sign":
            assert torch.allclose(n.abs(), torch.full_like(n, EPS), atol=1e-7)
            assert stats.binomtest(int((n > 0).sum()), n.numel()).pvalue > 1e-3  # P(+eps) = 1/2
        else:
            assert stats.ks_2samp(n[:20000].numpy(), -n[20000:40000].numpy()).pvalue > 1e-3  # n ~ -n
            clipped = (n.abs() >= EPS - 1e-9).float().mean().item()
            assert clipped == pytest.approx(2 * stats.norm.sf(1.0), abs=0.01)  # sigma = eps: 31.7% clipped
    real = Noise(EPS).perturb(tiny, pixels, tokens, seeds)
    assert (achieved_linf(pixels, real.pixels) <= EPS + 1e-6).all()
    # salted: the noise never replays the explainer's own per-sample draws (RISE masks, bottleneck noise)
    sign = Noise(EPS)(tiny, grey, tokens, many) - grey
    assert not torch.equal(sign.sign(), SampleRng(many, "cpu").normal(3, 224, 224).sign())


def test_differentiable_explainers_give_the_same_map_with_a_graph(tiny, batch):
    pixels, tokens, seeds = batch
    names = differentiable_explainers()
    assert set(names) == {"chefer", "eclip", "fastig", "game", "gem", "gradcam", "legrad", "maskclip", "rollout", "saliency",
                          "selfattn", "surgery", "surgery_demo", "saliency_nib", "fastig_nib"}
    from clip_xai.config import build

    one = tokens.index(slice(0, 1))
    direction = torch.randn(pixels[:1].shape, generator=torch.Generator().manual_seed(1))
    h = 1e-3
    for name in names:
        explainer = build(compose_cfg([f"explainer={name}"]), "explainer")
        plain = explainer(tiny, pixels[:1], one, seeds[:1])
        x = pixels[:1].clone().requires_grad_(True)
        with keep_graph():
            m = explainer.explain(tiny, x, one, seeds[:1])
        assert torch.allclose(m.detach(), plain, rtol=1e-5, atol=1e-6), name
        weights = torch.randn(m.shape, generator=torch.Generator().manual_seed(2))
        (g,) = torch.autograd.grad((m * weights).sum(), [x])
        assert torch.isfinite(g).all(), name
        if name == "saliency":
            # |∂s/∂x| has a kink wherever a pixel's gradient crosses zero, and at 150k pixels a
            # finite step crosses many (float64 differences agree only below h = 1e-6): compare
            # with the Hessian-vector product of the cosine written out here instead.
            want = _saliency_map_gradient(tiny, pixels[:1], one, weights)
            assert (g - want).abs().max() <= 1e-4 * want.abs().max(), name
            continue
        # The map's directional derivative equals a central difference of the plain maps (float32,
        # h = 1e-3: measured agreement 0.02-0.4 %; a map that does not depend on x would give a
        # zero difference, which a `g != 0` check cannot tell from rounding).
        plus = (explainer(tiny, pixels[:1] + h * direction, one, seeds[:1]) * weights).sum()
        minus = (explainer(tiny, pixels[:1] - h * direction, one, seeds[:1]) * weights).sum()
        finite = ((plus - minus) / (2 * h)).item()
        assert abs(finite) > 1e-4 and (g * direction).sum().item() == pytest.approx(finite, rel=2e-2), name


def _saliency_map_gradient(model, pixels, tokens, weights):
    """∂/∂x Σ weights · mean_c |∂cos/∂x| (the Saliency map, reduce=mean) by double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    z = pixels.detach().clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # the only attention kernel with a double backward on CPU
        emb = model.vision(z)[0]
        s = (torch.nn.functional.normalize(emb, dim=-1) * text_target(model, tokens)).sum()
        (g,) = torch.autograd.grad(s, [z], create_graph=True)
        (hv,) = torch.autograd.grad((g.abs().mean(1) * weights).sum(), [z])
    return hv


def test_softplus_swap_is_reversible(tiny, batch):
    pixels, tokens, _ = batch
    before = [type(m).__name__ for m in tiny.vision.modules()]
    s = similarity(tiny, pixels[:1], tokens.index(slice(0, 1)))
    with softplus_activations(tiny.vision, 10.0):
        assert "QuickGELU" not in {type(m).__name__ for m in tiny.vision.modules()}
        assert not torch.equal(similarity(tiny, pixels[:1], tokens.index(slice(0, 1))), s)
    with pytest.raises(RuntimeError):
        with softplus_activations(tiny.vision, 10.0):
            raise RuntimeError("inside")
    assert [type(m).__name__ for m in tiny.vision.modules()] == before
    assert torch.equal(similarity(tiny, pixels[:1], tokens.index(slice(0, 1))), s)


def test_map_attack_moves_gradcam_more_than_noise_within_the_similarity_bound(tiny, batch):
    pixels, tokens, seeds = batch
    gradcam, size = GradCAM(), tuple(pixels.shape[-2:])
    p0 = mass_map(gradcam(tiny, pixels, tokens, seeds), size)
    top = torch.topk(p0, 100, dim=1).indices

    def moved(x):  # the topk objective, computed here from the maps
        p = mass_map(gradcam(tiny, x, tokens, seeds), size)
        return (p0.gather(1, top) - p.gather(1, top)).sum(1)

    delta = 0.01
    attack = MapAttack(EPS, steps=3, max_sim_change=delta)
    attack.bind(gradcam, tiny)
    s0 = similarity(tiny, pixels, tokens)
    attacked, noise = [], []
    for draw in range(2):  # random starts
        res = attack.perturb(tiny, pixels, tokens, seeds + 10 * draw)
        assert (achieved_linf(pixels, res.pixels) <= EPS + 1e-6).all()
        assert ((similarity(tiny, res.pixels, tokens) - s0).abs() <= delta + 1e-5).all()
        assert torch.allclose(res.objective, moved(res.pixels), atol=1e-5)
        attacked.append(res.objective)
    for draw in range(6):
        noise.append(moved(Noise(EPS)(tiny, pixels, tokens, seeds + 10 * draw)))
    attacked, noise = torch.cat(attacked), torch.cat(noise)
    assert attacked.mean() > 2 * noise.mean()
    assert stats.mannwhitneyu(attacked.numpy(), noise.numpy(), alternative="greater").pvalue < 0.05


def test_map_attack_needs_a_differentiable_explainer_or_a_surrogate(tiny):
    attack = MapAttack(EPS)
    with pytest.raises(ClipXaiError, match="surrogate=gradcam") as err:
        attack.bind(RISE(), tiny)
    assert "gradcam" in err.value.fix and "rise" in str(err.value)
    transfer = MapAttack(EPS, surrogate="gradcam")
    transfer.bind(RISE(), tiny)
    assert isinstance(transfer.explainer, GradCAM) and transfer.label == "map_attack(gradcam)"
    with pytest.raises(ClipXaiError, match="no map differentiable"):
        MapAttack(EPS, surrogate="m2ib").bind(RISE(), tiny)
    with pytest.raises(ClipXaiError, match="not an explainer"):
        MapAttack(EPS, surrogate="nope").bind(RISE(), tiny)
    with pytest.raises(ClipXaiError, match="random_start"):
        MapAttack(EPS, objective="distance", random_start=False)


@pytest.mark.parametrize("bad", ["perturbation.eps=2", "perturbation.space=hsv", "perturbation.direction=up"])
def test_bad_settings_are_one_clear_error(bad):
    from clip_xai.config import build

    for group in ("fgsm", "pgd"):
        with pytest.raises(ClipXaiError, match=bad.split("=")[0].split(".")[1]):
            build(compose_cfg([f"perturbation={group}", bad]), "perturbation")
    with pytest.raises(ClipXaiError, match="steps"):
        build(compose_cfg(["perturbation=pgd", "perturbation.steps=0"]), "perturbation")
    with pytest.raises(ClipXaiError, match="kind"):
        build(compose_cfg(["perturbation=noise", "perturbation.kind=uniform"]), "perturbation")
