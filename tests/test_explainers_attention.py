"""Attention explainers (GAME, chefer, rollout, Grad-ECLIP): contracts on every backend, and
hand-computed maps on the tiny open_clip model from an independent forward written here."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from clip_xai.config import build
from clip_xai.errors import ClipXaiError
from clip_xai.explainers.chefer import Chefer
from clip_xai.explainers.eclip import GradECLIP
from clip_xai.explainers.game import GAME
from clip_xai.explainers.gradcam import GradCAM
from clip_xai.explainers.rollout import Rollout
from clip_xai.explainers.selfattn import SelfAttention
from tests.helpers import varies

CONF = Path(__file__).resolve().parents[1] / "conf" / "explainer"
METHODS = {"game": GAME, "chefer": Chefer, "rollout": Rollout, "eclip": GradECLIP, "selfattn": SelfAttention}
TOL = 1e-5


def _altclip_missing() -> bool:
    try:
        import clip_xai.models.altclip  # noqa: F401
    except Exception:  # noqa: BLE001 - the AltCLIP backend may not be finished yet
        return True
    return False


@pytest.fixture(scope="module", params=["tiny", pytest.param("altclip_tiny", marks=pytest.mark.skipif(
    _altclip_missing(), reason="clip_xai.models.altclip is not importable yet"))])
def model(request):
    return request.getfixturevalue(request.param)


def _close(a: Tensor, b: Tensor, tol: float = TOL) -> bool:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() <= tol * scale


# --- contracts on every backend ---------------------------------------------------------------


PAIRS = [0, 3]  # two of the real sample pairs (batch_for gives four)


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_contract(model, batch_for, method, modality):
    pixels, tokens, seeds = batch_for(model, 4)
    pixels, tokens, seeds = pixels[PAIRS], tokens.index(PAIRS), seeds[PAIRS]
    explainer = METHODS[method](modality=modality)
    maps = explainer(model, pixels, tokens, seeds)
    expected = (2, *model.grid) if modality == "image" else tuple(tokens.ids.shape)
    assert tuple(maps.shape) == expected
    assert torch.isfinite(maps).all()
    assert not maps.requires_grad
    if modality == "image":
        assert all(varies(m) for m in maps), "an image map is constant"
    else:
        content = tokens.content_mask
        # Grad-ECLIP text is ReLU of a sum that a random model can make negative on every token of
        # a caption; at least one of the real pairs must still give a non-constant map.
        informative = [varies(m[c]) for m, c in zip(maps, content)]
        assert all(informative) if method != "eclip" else any(informative), "a text map is constant"
    singles = [explainer(model, pixels[i:i + 1], tokens.index(slice(i, i + 1)), seeds[i:i + 1]) for i in range(2)]
    for i, single in enumerate(singles):
        assert _close(single[0], maps[i]), f"sample {i} depends on its batch mate"
    again = explainer(model, pixels[1:], tokens.index(slice(1, 2)), seeds[1:])
    assert torch.equal(again, singles[1]), "same inputs and seed gave different maps"


@pytest.mark.parametrize("explainer", [
    Chefer(layer=-3), GradECLIP(single_head=False), GradECLIP(withksim=False), GradECLIP(image_layers=3),
    GradECLIP(modality="text", ksim_keys="attended"), GradECLIP(modality="text", single_head=False, text_layers=12),
    Rollout(modality="text", start_layer=0),
], ids=lambda e: e.name + "-" + e.modality)
def test_variants_run(tiny, batch_for, explainer):
    pixels, tokens, seeds = batch_for(tiny, 1)
    maps = explainer(tiny, pixels, tokens, seeds)
    assert tuple(maps.shape) == ((1, *tiny.grid) if explainer.modality == "image" else tuple(tokens.ids.shape))
    assert torch.isfinite(maps).all()


def test_yaml_defaults_match_constructors():
    for method, cls in METHODS.items():
        cfg = OmegaConf.create({"explainer": OmegaConf.load(CONF / f"{method}.yaml")})
        assert cfg.explainer.name == method and cfg.explainer.modality == "image"
        built = build(cfg, "explainer")
        assert type(built) is cls
        assert built.config_key() == cls().config_key(), f"{method}.yaml defaults differ from the class defaults"


def test_modality_errors():
    for cls in METHODS.values():
        with pytest.raises(ClipXaiError):
            cls(modality="audio")
    with pytest.raises(ClipXaiError):
        GradCAM(modality="text")  # an image-only method asked for text
    with pytest.raises(ClipXaiError):
        GradECLIP(ksim_keys="some")
    with pytest.raises(ClipXaiError):
        GradECLIP(text_layers=0)


def test_bad_layers_raise(tiny, batch_for):
    pixels, tokens, seeds = batch_for(tiny, 1)
    bad = (GAME(start_layer=12), Rollout(start_layer=-13), Chefer(modality="text", layer=12),
           GradECLIP(modality="text", text_layers=13))
    for explainer in bad:
        with pytest.raises(ClipXaiError):
            explainer.check_model(tiny)  # fails before any work
        with pytest.raises(ClipXaiError):
            explainer(tiny, pixels, tokens, seeds)
    for explainer in (GAME(start_layer=0), Rollout(start_layer=-12), Chefer(), GradECLIP(modality="text")):
        explainer.check_model(tiny)


# --- attention capture against the native weights ---------------------------------------------


def _manual_probs(block, x_in: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q kᵀ/√dh + mask) from the open_clip block's own ln_1 / in_proj weights."""
    attn = block.attn
    q, k, _ = F.linear(block.ln_1(x_in), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    b, n, d = q.shape
    h = attn.num_heads
    q, k = (t.reshape(b, n, h, d // h).permute(0, 2, 1, 3) for t in (q, k))
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d // h)
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1)


def test_recorded_probs_vision(tiny, batch_for):
    pixels, _, _ = batch_for(tiny, 2)
    with torch.no_grad():
        _, records = tiny.vision(pixels, record=(0, 5, 11))
    for i, rec in records.items():
        manual = _manual_probs(tiny.model.visual.transformer.resblocks[i], rec.x_in, None)
        assert rec.probs.shape == (2, 2, 197, 197)
        assert _close(rec.probs, manual)
        assert torch.allclose(rec.probs.sum(-1), torch.ones(()), atol=1e-5)


def test_recorded_probs_text_causal(tiny, batch_for):
    _, tokens, _ = batch_for(tiny, 2)
    with torch.no_grad():
        _, records = tiny.text(tokens, record=(0, 11))
    n = tokens.ids.shape[1]
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i, rec in records.items():
        manual = _manual_probs(tiny.model.transformer.resblocks[i], rec.x_in, causal)
        assert _close(rec.probs, manual)
        assert torch.allclose(rec.probs.sum(-1), torch.ones(()), atol=1e-5)
        assert (rec.probs.triu(1) == 0).all(), "a token attends to a later one"


# --- hand-computed maps from an independent forward of the tiny open_clip model ----------------


def _hand_blocks(blocks, x: Tensor, mask: Tensor | None, heads: list[int]) -> tuple[Tensor, list[dict]]:
    """Pre-LN blocks written out: x + out_proj(softmax(q kᵀ/√dh + mask) v); x + mlp(ln_2 x)."""
    saved = []
    for block, h in zip(blocks, heads):
        attn = block.attn
        q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        b, n, d = q.shape
        qh, kh, vh = (t.reshape(b, n, h, d // h).permute(0, 2, 1, 3) for t in (q, k, v))
        scores = torch.einsum("bhid,bhjd->bhij", qh, kh) / math.sqrt(d // h)
        probs = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        ctx = torch.einsum("bhij,bhjd->bhid", probs, vh).permute(0, 2, 1, 3).reshape(b, n, d)
        x = x + attn.out_proj(ctx)
        x = x + block.mlp(block.ln_2(x))
        saved.append({"q": q, "k": k, "v": v, "probs": probs, "ctx": ctx, "out_proj": attn.out_proj})
    return x, saved


def _hand_image(tiny, pixels: Tensor, last_heads: int | None = None):
    """Unit image embedding and per-block tensors; the graph starts at the patch embeddings."""
    visual = tiny.model.visual
    x = visual.conv1((pixels - tiny.vision.mean) / tiny.vision.std).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x).detach().requires_grad_(True)
    blocks = list(visual.transformer.resblocks)
    heads = [b.attn.num_heads for b in blocks]
    if last_heads is not None:
        heads[-1] = last_heads
    x, saved = _hand_blocks(blocks, x, None, heads)
    emb = visual.ln_post(x[:, 0]) @ visual.proj
    return emb / emb.norm(dim=-1, keepdim=True), saved


def _hand_text(tiny, tokens, single_last: int = 0):
    m = tiny.model
    ids = tokens.ids
    n = ids.shape[1]
    x = (m.token_embedding(ids) + m.positional_embedding[:n]).detach().requires_grad_(True)
    causal = torch.full((n, n), float("-inf")).triu(1)
    blocks = list(m.transformer.resblocks)
    heads = [b.attn.num_heads for b in blocks]
    for i in range(len(blocks) - single_last, len(blocks)):
        heads[i] = 1
    x, saved = _hand_blocks(blocks, x, causal, heads)
    eot = ids.argmax(dim=-1)
    emb = m.ln_final(x[torch.arange(ids.shape[0]), eot]) @ m.text_projection
    return emb / emb.norm(dim=-1, keepdim=True), saved, eot


def _native_unit(tiny, pixels, tokens):
    with torch.no_grad():
        img = tiny.model.encode_image((pixels - tiny.vision.mean) / tiny.vision.std)
        txt = tiny.model.encode_text(tokens.ids)
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def _minmax(t: Tensor) -> Tensor:
    return (t - t.min()) / (t.max() - t.min())


@pytest.fixture(scope="module")
def one_pair(tiny, sample_images):
    pixels, captions = sample_images
    return pixels[:1], tiny.tokenize([captions[0]])


def test_hand_forward_matches_native(tiny, one_pair):
    pixels, tokens = one_pair
    img, txt = _native_unit(tiny, pixels, tokens)
    assert _close(_hand_image(tiny, pixels)[0], img)
    assert _close(_hand_text(tiny, tokens)[0], txt)


def test_rollout_by_hand(tiny, batch_for):
    pixels, tokens, seeds = batch_for(tiny, 2)
    with torch.no_grad():
        _, records = tiny.vision(pixels, record=range(12))
    eye = torch.eye(197)

    def expected(start: int) -> Tensor:
        joint = eye
        for i in range(start, 12):
            a = records[i].probs.mean(1) + eye
            joint = torch.bmm(a / a.sum(-1, keepdim=True), joint.expand_as(a))
        return joint[:, 0, 1:].reshape(2, 14, 14)

    for start, layer in ((11, -1), (10, -2), (0, 0)):
        assert _close(Rollout(start_layer=layer)(tiny, pixels, tokens, seeds), expected(start))
    # start_layer=-1 is just rownorm(A_last + I)[CLS, patches] = (A_last[CLS, patches]) / 2
    assert _close(Rollout()(tiny, pixels, tokens, seeds), records[11].probs.mean(1)[:, 0, 1:].reshape(2, 14, 14) / 2)


def test_rollout_text_by_hand(tiny, one_pair):
    pixels, tokens = one_pair
    with torch.no_grad():
        _, saved, eot = _hand_text(tiny, tokens)
    n = tokens.ids.shape[1]
    joint = torch.eye(n)
    for s in saved[-2:]:
        a = s["probs"][0].mean(0) + torch.eye(n)
        joint = (a / a.sum(-1, keepdim=True)) @ joint
    got = Rollout(modality="text", start_layer=-2)(tiny, pixels, tokens)
    assert _close(got[0], joint[eot[0]])


def test_game_and_chefer_by_hand(tiny, one_pair):
    pixels, tokens = one_pair
    _, txt = _native_unit(tiny, pixels, tokens)
    img, saved = _hand_image(tiny, pixels)
    s = (img * txt).sum()
    grads = torch.autograd.grad(s, [b["probs"] for b in saved])
    cams = [(g * b["probs"]).clamp(min=0).mean(1)[0] for g, b in zip(grads, saved)]
    eye = torch.eye(197)
    # Reference default: last block only → the CLS row of I + Ā_last.
    last = (eye + cams[-1])[0, 1:].reshape(1, 14, 14)
    assert _close(GAME(target_scale=1.0)(tiny, pixels, tokens), last)
    assert _close(GAME()(tiny, pixels, tokens), tiny.logit_scale * last)  # one block: the scale only multiplies
    assert _close(Chefer()(tiny, pixels, tokens), cams[-1][0, 1:].reshape(1, 14, 14))
    # Full recursion R ← R + Ā R over all blocks.
    r = eye
    for cam in cams:
        r = r + cam @ r
    assert _close(GAME(start_layer=0, target_scale=1.0)(tiny, pixels, tokens), r[0, 1:].reshape(1, 14, 14))
    # The logit scale c multiplies Ā: with target_scale the k-th order terms scale like c^k.
    r = eye
    for cam in cams[-2:]:
        r = r + 100.0 * cam @ r
    assert _close(GAME(start_layer=-2, target_scale=100.0)(tiny, pixels, tokens), r[0, 1:].reshape(1, 14, 14))


@pytest.mark.parametrize("modality", ["image", "text"])
def test_game_logit_target_is_the_models_scale(model, batch_for, modality):
    """``target_scale: logit`` (default) = an explicit scale equal to exp(the checkpoint's logit_scale)."""
    pixels, tokens, seeds = batch_for(model, 1)
    scale = float(model.model.logit_scale.exp())
    assert model.logit_scale == pytest.approx(scale)
    got = GAME(modality=modality, start_layer=-3)(model, pixels, tokens, seeds)
    assert torch.equal(got, GAME(modality=modality, start_layer=-3, target_scale=scale)(model, pixels, tokens, seeds))
    cosine = GAME(modality=modality, start_layer=-3, target_scale=1.0)(model, pixels, tokens, seeds)
    assert not _close(got, cosine, 1e-3), "over several blocks the scale must change the map"


def test_game_rejects_bad_target_scale():
    for bad in ("cosine", 0, -1.0):
        with pytest.raises(ClipXaiError):
            GAME(target_scale=bad)


def test_game_text_by_hand(tiny, one_pair):
    pixels, tokens = one_pair
    img, _ = _native_unit(tiny, pixels, tokens)
    txt, saved, eot = _hand_text(tiny, tokens)
    grads = torch.autograd.grad((img * txt).sum(), [b["probs"] for b in saved[-2:]])
    n = tokens.ids.shape[1]
    r = torch.eye(n)
    for g, b in zip(grads, saved[-2:]):
        r = r + (g * b["probs"]).clamp(min=0).mean(1)[0] @ r
    assert _close(GAME(modality="text", start_layer=-2, target_scale=1.0)(tiny, pixels, tokens)[0], r[eot[0]])


@pytest.mark.parametrize("ksim_proj", [True, False])
def test_eclip_image_by_hand(tiny, one_pair, ksim_proj):
    pixels, tokens = one_pair
    _, txt = _native_unit(tiny, pixels, tokens)
    img, saved = _hand_image(tiny, pixels, last_heads=1)
    last = saved[-1]
    (g,) = torch.autograd.grad((img * txt).sum(), [last["ctx"]])
    g = g[0, 0]  # CLS position
    with torch.no_grad():
        q, k, v = last["q"][0], last["k"][0], last["v"][0]
        if ksim_proj:
            q, k = last["out_proj"](q), last["out_proj"](k)
        lam = _minmax(F.cosine_similarity(q[0:1], k[1:], dim=-1))
        expected = ((v[1:] @ g) * lam).clamp(min=0).reshape(1, 14, 14)
    got = GradECLIP(ksim_proj=ksim_proj)(tiny, pixels, tokens)
    assert expected.abs().max() > 0
    assert _close(got, expected)


def test_eclip_text_by_hand(tiny, one_pair):
    pixels, tokens = one_pair
    img, _ = _native_unit(tiny, pixels, tokens)
    n_last = 3
    txt, saved, eot = _hand_text(tiny, tokens, single_last=n_last)
    e = int(eot[0])
    blocks = saved[-n_last:]
    grads = torch.autograd.grad((img * txt).sum(), [b["ctx"] for b in blocks])
    total = 0
    with torch.no_grad():
        for g, b in zip(grads, blocks):
            q, k = b["out_proj"](b["q"][0]), b["out_proj"](b["k"][0])
            lam = _minmax(F.cosine_similarity(q[e:e + 1], k, dim=-1))  # all 77 positions
            total = total + (b["v"][0] @ g[0, e]) * lam
    expected = total.clamp(min=0)
    got = GradECLIP(modality="text", text_layers=n_last)(tiny, pixels, tokens)[0]
    assert _close(got, expected)
    pre_relu = (got - total).abs()[total > 0]
    assert pre_relu.numel() > 0 and pre_relu.max() < 1e-6  # ReLU of the SUM, not a sum of ReLUs


def test_selfattn_image_by_hand(tiny, one_pair):
    """Image: the CLS row of the single-head last block over the patches (GE clip_encode_dense)."""
    pixels, tokens = one_pair
    with torch.no_grad():
        _, saved = _hand_image(tiny, pixels, last_heads=1)
    expected = saved[-1]["probs"][0, 0, 0, 1:].reshape(1, 14, 14)
    assert _close(SelfAttention()(tiny, pixels, tokens), expected)
    with torch.no_grad():
        _, saved = _hand_image(tiny, pixels)
    mean_heads = saved[-1]["probs"][0].mean(0)[0, 1:].reshape(1, 14, 14)
    assert _close(SelfAttention(heads="mean")(tiny, pixels, tokens), mean_heads)


@pytest.mark.parametrize("n_last", [1, 3, 8])
def test_selfattn_text_layers_by_hand(tiny, one_pair, n_last):
    """Text: the EOT row of the last block when the last ``text_layers`` blocks run single-head
    (GE grad_eclip_text.ipynb ``self_attn`` on ``clip_encode_text_dense(text, n=8)``)."""
    pixels, tokens = one_pair
    with torch.no_grad():
        _, saved, eot = _hand_text(tiny, tokens, single_last=n_last)
    expected = saved[-1]["probs"][0, 0, eot[0]]
    got = SelfAttention(modality="text", text_layers=n_last)(tiny, pixels, tokens)[0]
    assert _close(got, expected)


def test_selfattn_text_layers_matter_and_are_checked(tiny, one_pair):
    pixels, tokens = one_pair
    one = SelfAttention(modality="text", text_layers=1)(tiny, pixels, tokens)
    eight = SelfAttention(modality="text")(tiny, pixels, tokens)
    assert not _close(one, eight, 1e-3)
    assert SelfAttention().text_layers == 8 and SelfAttention().image_layers == 1
    with pytest.raises(ClipXaiError):
        SelfAttention(modality="text", text_layers=13).check_model(tiny)
    with pytest.raises(ClipXaiError):
        SelfAttention(text_layers=0)
