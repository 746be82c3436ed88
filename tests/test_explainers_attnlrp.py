"""AttnLRP (clip_xai/explainers/attnlrp.py, lrp_rules.py).

* each rule, on a hand-sized case, against the paper's explicit relevance formula (numpy-free
  float64 arithmetic written out here, not the modified gradient);
* conservation: in float64 the input relevances plus what the biases and the softmax absorb sum
  to the explained score, per tower, backend and attention rule;
* the forward is the native one, hooks never stay attached, the requirements and the "rules did
  not apply" guard give one clear error;
* the real entrypoint on the tiny model, sensitivity (image) and faithfulness (image + text).
"""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from clip_xai.errors import ClipXaiError
from clip_xai.explainers import attnlrp as attnlrp_mod
from clip_xai.explainers.attnlrp import AttnLRP, lrp_attention, module_rules, relevance_forward
from clip_xai.explainers.base import other_target, tower_for
from clip_xai.explainers.lrp_rules import identity_rule, layer_norm_identity, uniform, unit_identity
from tests.helpers import run_cli

D = torch.float64


def relevance_through(fn, inputs, r_out):
    """Gradient×Input relevances of ``inputs`` when ``fn(*inputs)`` carries relevance ``r_out``:
    the upstream gradient is r_out / output (so that output ⊙ gradient = r_out)."""
    xs = [x.clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, grad_outputs=r_out / out, allow_unused=True)
    return [x.detach() * (torch.zeros_like(x) if g is None else g) for x, g in zip(xs, grads)], out.detach()


# --- each rule against the paper's explicit formula ----------------------------------------


def test_identity_rule_passes_relevance_unchanged():
    x = torch.tensor([-2.0, -0.3, 0.7, 3.0], dtype=D)
    r_out = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=D)
    (r_in,), y = relevance_through(lambda t: identity_rule(t, F.gelu(t)), [x], r_out)
    assert torch.equal(y, F.gelu(x))  # the value is the non-linearity's own
    assert torch.allclose(r_in, r_out, rtol=0, atol=1e-15)  # paper Eq. 9: R_in = R_out
    zero = torch.zeros(2, dtype=D, requires_grad=True)  # f(0) = 0: no relevance and a finite gradient
    (g,) = torch.autograd.grad(identity_rule(zero, F.gelu(zero)).sum(), [zero])
    assert torch.equal(g, torch.zeros(2, dtype=D))


def test_layer_norm_rule_is_the_epsilon_rule_of_the_frozen_linear_map():
    """LN with σ constant is y = M x + b with M = diag(w)(I − 11ᵀ/n)/σ; the ε-rule (ε=0) of that
    linear map gives R_i = Σ_j x_i M_ji / y_j · R_j, the bias b absorbing Σ_j b_j/y_j · R_j."""
    x = torch.tensor([[1.0, 2.0, 4.0]], dtype=D)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    b = torch.tensor([0.1, 0.0, -0.3], dtype=D)
    eps = 1e-5
    r_out = torch.tensor([[0.3, -0.2, 0.6]], dtype=D)
    y_native = F.layer_norm(x, (3,), w, b, eps)
    (r_in,), y = relevance_through(lambda t: layer_norm_identity(t, F.layer_norm(t, (3,), w, b, eps), w, None, eps, 1),
                                   [x], r_out)
    assert torch.equal(y, y_native)
    mean = (1 + 2 + 4) / 3
    sigma = ((((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 3) + eps) ** 0.5
    centre = [[(1.0 if i == j else 0.0) - 1 / 3 for j in range(3)] for i in range(3)]  # C[i][j]
    m = [[w[i].item() * centre[i][j] / sigma for j in range(3)] for i in range(3)]  # M[i][j]: output i, input j
    yv = y_native[0].tolist()
    want = [sum(x[0, i].item() * m[j][i] / yv[j] * r_out[0, j].item() for j in range(3)) for i in range(3)]
    assert torch.allclose(r_in[0], torch.tensor(want, dtype=D), rtol=1e-12, atol=1e-15)
    absorbed = sum(b[j].item() / yv[j] * r_out[0, j].item() for j in range(3))
    assert abs(r_in.sum().item() + absorbed - r_out.sum().item()) < 1e-12


def test_uniform_rule_splits_each_product_term_in_half():
    """Paper Eq. 7 on o = a·b: term (i,j,k) gets a_ij b_jk / o_ik of R_ik, half to each factor."""
    a = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], dtype=D)
    b = torch.tensor([[1.0, 0.5], [-2.0, 1.0], [0.75, -0.25]], dtype=D)
    r_out = torch.tensor([[1.0, -0.5], [0.25, 2.0]], dtype=D)
    (ra, rb), o = relevance_through(lambda p, q: uniform(p) @ uniform(q), [a, b], r_out)
    want_a = torch.zeros_like(a)
    want_b = torch.zeros_like(b)
    for i in range(2):
        for j in range(3):
            for k in range(2):
                share = a[i, j] * b[j, k] / o[i, k] * r_out[i, k]
                want_a[i, j] += share / 2
                want_b[j, k] += share / 2
    assert torch.allclose(ra, want_a, rtol=1e-12, atol=1e-15) and torch.allclose(rb, want_b, rtol=1e-12, atol=1e-15)
    assert abs(ra.sum() + rb.sum() - r_out.sum()) < 1e-12  # a product without bias conserves


def test_softmax_rule_is_the_papers_formula():
    """Paper Prop. 3.3: R_in_i = x_i (R_i − s_i Σ_j R_j)."""
    x = torch.tensor([0.2, -1.0, 1.5, 0.0], dtype=D)
    r_out = torch.tensor([0.4, -0.1, 1.0, 0.3], dtype=D)
    (r_in,), s = relevance_through(lambda t: t.softmax(-1), [x], r_out)
    assert torch.allclose(r_in, x * (r_out - s * r_out.sum()), rtol=1e-12, atol=1e-15)


def test_unit_norm_identity_rule_conserves():
    e = torch.tensor([[3.0, -4.0, 12.0]], dtype=D)
    t = torch.tensor([[0.6, 0.0, 0.8]], dtype=D)
    (r,), s = relevance_through(lambda v: (unit_identity(v) * t).sum(-1), [e], torch.ones(1, dtype=D) * 0.5)
    assert torch.allclose(r, e * t / 13 * (0.5 / s), rtol=1e-12) and abs(r.sum() - 0.5) < 1e-12


def explicit_attention_relevance(q, k, v, r_o, rule):
    """The chain of explicit rules for one head, written out: o = A v (uniform, or all to v for CP),
    A = softmax(z) (softmax rule), z = q kᵀ/√d (uniform)."""
    n, d = q.shape
    z = q @ k.T / d**0.5
    a = z.softmax(-1)
    o = a @ v
    r_a = torch.zeros_like(a)
    r_v = torch.zeros_like(v)
    for i in range(n):
        for j in range(n):
            for c in range(v.shape[1]):
                share = a[i, j] * v[j, c] / o[i, c] * r_o[i, c]
                if rule == "cp":
                    r_v[j, c] += share
                else:
                    r_a[i, j] += share / 2
                    r_v[j, c] += share / 2
    r_q, r_k = torch.zeros_like(q), torch.zeros_like(k)
    if rule == "attnlrp":
        r_z = z * (r_a - a * r_a.sum(-1, keepdim=True))
        for i in range(n):
            for j in range(n):
                for c in range(d):
                    share = q[i, c] * k[j, c] / d**0.5 / z[i, j] * r_z[i, j]
                    r_q[i, c] += share / 2
                    r_k[j, c] += share / 2
    return r_q, r_k, r_v


@pytest.mark.parametrize("rule", ["attnlrp", "cp"])
def test_attention_rules_match_the_explicit_chain(rule):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, generator=g, dtype=D) for _ in range(3))
    r_o = torch.randn(3, 2, generator=g, dtype=D)
    got, _ = relevance_through(lambda a, b, c: lrp_attention(a[None, None], b[None, None], c[None, None], None, rule)[0, 0],
                               [q, k, v], r_o)
    for name, have, want in zip("qkv", got, explicit_attention_relevance(q, k, v, r_o, rule)):
        assert torch.allclose(have, want, rtol=1e-10, atol=1e-13), name


# --- conservation on the real towers --------------------------------------------------------


def conservation_terms(model, modality, rule, pixels, tokens):
    """(s, Σ input relevance, Σ bias relevance, softmax absorption), each summed over the batch."""
    tower = tower_for(model, modality)
    target = other_target(model, modality, pixels, tokens)
    inputs = pixels if modality == "image" else tokens
    biases = [p for n, p in tower.named_parameters() if n.endswith("bias")]
    with torch.no_grad():
        start, bias = tower.input_embedding(inputs)
    start = start.detach().requires_grad_(True)
    try:
        for p in biases:
            p.requires_grad_(True)
        with torch.enable_grad():
            s, counts = relevance_forward(tower, start, bias, inputs, target, rule, keep=rule == "attnlrp")
            grads = torch.autograd.grad(s.sum(), [start, *biases, *counts.probs, *counts.scores], allow_unused=True)
    finally:
        for p in biases:
            p.requires_grad_(False)
    n, k = len(biases), len(counts.probs)
    g_start, g_b, g_p, g_z = grads[0], grads[1:1 + n], grads[1 + n:1 + n + k], grads[1 + n + k:]
    with torch.no_grad():
        r_in = (start * g_start).sum().item()
        r_b = sum((p * g).sum().item() for p, g in zip(biases, g_b) if g is not None)
        absorbed = sum(((p * gp).sum() - torch.where(torch.isfinite(z), z * gz, 0).sum()).item()
                       for p, gp, z, gz in zip(counts.probs, g_p, counts.scores, g_z))
    return s.detach().sum().item(), r_in, float(r_b), float(absorbed)


@pytest.mark.parametrize("rule", ["cp", "attnlrp"])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_relevance_is_conserved_up_to_biases_and_softmax(any_model, batch_for, modality, rule):
    """Every rule is linear once its frozen factors are fixed, except the softmax rule, so
    score = Σ input relevance + Σ bias relevance + Σ_softmax (ΣR_out − ΣR_in), to float64 rounding.
    The uniform halves make q·kᵀ and A·v conserve; CP-LRP has no softmax term."""
    model = copy.deepcopy(any_model).double()
    pixels, tokens, _ = batch_for(model)
    s, r_in, r_b, absorbed = conservation_terms(model, modality, rule, pixels.double(), tokens)
    assert abs(s - (r_in + r_b + absorbed)) < 1e-12 * max(1.0, abs(r_in) + abs(r_b) + abs(absorbed))
    if rule == "cp":
        assert absorbed == 0.0
    else:
        assert abs(absorbed) > 1e-6  # the softmax term is real, not a rounding artefact


def test_pixel_relevance_sums_to_the_patch_token_relevance(tiny, batch_for):
    """The patch convolution has no bias, so each patch's pixel relevances add up to the relevance
    of its patch embedding (the token's input embedding less its position embedding)."""
    pixels, tokens, seeds = batch_for(tiny)
    per_pixel = AttnLRP()(tiny, pixels, tokens, seeds)
    start, g, _, _ = AttnLRP(image_input="tokens").relevance(tiny, pixels, tokens)
    patch_part = tiny.patch_map(((start - tiny.model.visual.positional_embedding) * g).sum(-1))
    p = tiny.patch_size
    pooled = per_pixel.unflatten(1, (-1, p)).unflatten(3, (-1, p)).sum((2, 4))
    assert torch.allclose(pooled, patch_part, rtol=1e-4, atol=1e-6 * patch_part.abs().max().item())
    # and the token map is the full input-embedding relevance on the patch grid
    tokens_map = AttnLRP(image_input="tokens")(tiny, pixels, tokens, seeds)
    assert torch.allclose(tokens_map, tiny.patch_map((start * g).sum(-1)))


# --- forward, hooks, errors -----------------------------------------------------------------


@pytest.mark.parametrize("modality", ["image", "text"])
def test_score_is_the_native_cosine_and_maps_have_the_right_shape(any_model, batch_for, modality):
    pixels, tokens, seeds = batch_for(any_model)
    ex = AttnLRP(modality=modality)
    _, _, s, _ = ex.relevance(any_model, pixels, tokens)
    with torch.no_grad():
        native = (any_model.encode_image(pixels) * any_model.encode_text(tokens)).sum(-1)
    assert torch.allclose(s, native, rtol=1e-5, atol=1e-7)
    m = ex(any_model, pixels, tokens, seeds)
    assert m.shape == ((2, 224, 224) if modality == "image" else tokens.ids.shape)
    assert torch.isfinite(m).all() and m.abs().max() > 0
    assert not any(mod._forward_hooks for mod in any_model.modules())


def test_hooks_are_removed_when_the_forward_fails(tiny):
    with pytest.raises(RuntimeError, match="boom"):
        with module_rules(tiny.vision):
            assert any(mod._forward_hooks for mod in tiny.vision.modules())
            raise RuntimeError("boom")
    assert not any(mod._forward_hooks for mod in tiny.modules())


def test_rules_that_did_not_apply_are_one_clear_error(tiny, batch_for, monkeypatch):
    pixels, tokens, seeds = batch_for(tiny)
    monkeypatch.setattr(attnlrp_mod, "activation_types", lambda: ())
    with pytest.raises(ClipXaiError, match="0 non-linearities"):
        AttnLRP()(tiny, pixels, tokens, seeds)
    assert not any(mod._forward_hooks for mod in tiny.modules())


def test_requirements_and_settings(tiny, batch_for, monkeypatch):
    pixels, tokens, seeds = batch_for(tiny)
    monkeypatch.setattr(tiny.vision, "missing", {"token_head": "it pools with an attentional pooler"})
    with pytest.raises(ClipXaiError, match="attentional pooler"):
        AttnLRP()(tiny, pixels, tokens, seeds)
    with pytest.raises(ClipXaiError, match="image_attention"):
        AttnLRP(image_attention="softmax")
    with pytest.raises(ClipXaiError, match="image_input"):
        AttnLRP(image_input="latent")
    from clip_xai.perturbations.map_attack import differentiable_explainers

    assert not AttnLRP.differentiable and "attnlrp" not in differentiable_explainers()


# --- the real entrypoint ----------------------------------------------------------------------


@pytest.mark.slow
def test_entrypoint_sensitivity_and_faithfulness_both_modalities(tmp_path):
    res = run_cli(["-m", "model=tiny", "dataset=sample", "explainer=attnlrp", "study=sensitivity,faithfulness",
                   "dataset.limit=2", "logger=none", "name=lrp", f"output_root={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    frames = {df["study"].iat[0]: df for df in (pd.read_parquet(p) for p in tmp_path.rglob("results.parquet")
                                                 if "report" not in p.parts)}
    sens, faith = frames["sensitivity"], frames["faithfulness"]
    assert sens["explainer"].eq("attnlrp").all() and sens["spearman"].notna().all() and sens["map_flag"].eq("").all()
    assert faith["modality"].eq("image+text").all()
    assert faith["conf_drop_image"].notna().all() and faith["conf_drop_text"].notna().all() and faith["road"].notna().all()


def test_yaml_defaults_match_the_constructor():
    from omegaconf import OmegaConf

    from clip_xai.config import build
    from clip_xai.paths import CONF_DIR

    cfg = OmegaConf.create({"explainer": OmegaConf.load(f"{CONF_DIR}/explainer/attnlrp.yaml")})
    built = build(cfg, "explainer")
    assert type(built) is AttnLRP and built.config_key() == AttnLRP().config_key()
