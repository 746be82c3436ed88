"""CLIP Surgery, MaskCLIP and RISE explainers on every backend (small random models)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.maskclip import MaskCLIP
from clip_xai.explainers.postprocess import image_maps
from clip_xai.explainers.rise import RISE, activation_bytes, auto_chunk, interp_matrix
from clip_xai.explainers.surgery import CLASS_NAMES, TEMPLATES, CLIPSurgery, surgery_tokens
from clip_xai.metrics.sensitivity.flags import decode_flags, map_flag_codes
from clip_xai.models.base import attend, merge_heads
from tests.helpers import varies

REPO = Path(__file__).resolve().parents[1]
FEW_CLASSES = ["person", "dog", "tree", "car", "sky"]

CASES = {
    "surgery_demo": lambda: CLIPSurgery(redundant="empty_prompt", image_norm="channels", templates="single"),
    "surgery_class_set": lambda: CLIPSurgery(templates="single", class_names=FEW_CLASSES),
    "maskclip": lambda: MaskCLIP(),
    "rise_image": lambda: RISE(n_masks=8, chunk=4, mask_seed=0),
    "rise_text": lambda: RISE(modality="text", n_masks_text=8, chunk=4, mask_seed=0),
}


@pytest.fixture(params=["tiny", "altclip_tiny"])
def model(request):
    """Like conftest's ``any_model``, but skips AltCLIP when its backend cannot be imported."""
    if request.param == "altclip_tiny":
        pytest.importorskip("clip_xai.models.altclip")
    return request.getfixturevalue(request.param)


# --- shared contract: shape, finite, informative, batch = singles, deterministic ---------------


@pytest.mark.parametrize("case", list(CASES))
def test_contract(model, batch_for, case):
    pixels, tokens, seeds = batch_for(model, 2)
    explainer = CASES[case]()
    out = explainer(model, pixels, tokens, seeds)
    if explainer.modality == "image":
        expected = (2, *model.grid) if not case.startswith("rise") else (2, *pixels.shape[-2:])
        assert tuple(out.shape) == expected
    else:
        assert tuple(out.shape) == tuple(tokens.ids.shape)
        assert (out[~tokens.content_mask] == 0).all()
    assert torch.isfinite(out).all()
    for i in range(2):
        values = out[i] if explainer.modality == "image" else out[i][tokens.content_mask[i]]
        assert varies(values), f"{case} gave a constant map for sample {i}"
    singles = torch.cat([explainer(model, pixels[i : i + 1], tokens.index([i]), seeds[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(out, singles, atol=1e-5, rtol=1e-4)
    again = CASES[case]()(model, pixels[:1], tokens.index([0]), seeds[:1])  # fresh instance, same seed
    assert torch.equal(again, singles[:1])


def last_block(model, pixels):
    """(vision tower, last block index, its BlockOps, its BlockRecord for ``pixels``)."""
    tower = model.vision
    last = tower.n_layers - 1
    with torch.no_grad():
        _, recs = tower(pixels, record=(last,))
    return tower, last, tower.blocks[last], recs[last]


# --- MaskCLIP ---------------------------------------------------------------------------------


def test_maskclip_matches_recomputation(model, batch_for):
    pixels, tokens, seeds = batch_for(model, 2)
    out = MaskCLIP()(model, pixels, tokens, seeds)
    tower, last, block, rec = last_block(model, pixels)
    with torch.no_grad():
        b, h, n, dh = rec.v.shape
        v = rec.v.permute(0, 2, 1, 3).reshape(b, n, h * dh)
        k = rec.k.permute(0, 2, 1, 3).reshape(b, n, h * dh)
        v_final = block.post_attn(rec.x_in, block.out_proj(v))
        feats = F.normalize(tower.project_tokens(v_final), dim=-1)
        text = F.normalize(model.text(tokens)[0], dim=-1)
        cos = torch.einsum("bne,be->bn", feats, text)
        k_out = block.out_proj(k)
        ksim = F.cosine_similarity(k_out[:, :1], k_out, dim=-1)
        expected = (cos * ksim)[:, 1:].reshape(b, *model.grid)
        # the value/key projections do not depend on the head split (the reference uses one head)
        _, one = tower(pixels, record=(last,), heads={last: 1})
        torch.testing.assert_close(one[last].merged("v"), v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    plain = MaskCLIP(ksim=False)(model, pixels, tokens, seeds)
    torch.testing.assert_close(plain, cos[:, 1:].reshape(b, *model.grid), atol=1e-5, rtol=1e-4)


# --- CLIP Surgery -----------------------------------------------------------------------------


def test_surgery_zero_layers_is_plain_forward(model, batch_for):
    pixels, _, _ = batch_for(model, 2)
    tower = model.vision
    with torch.no_grad():
        x, bias = tower.embed(pixels)
        x, _ = tower.run(x, bias)
        plain = tower.project_tokens(x)
        ours = surgery_tokens(tower, pixels, 0)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-4)


def test_surgery_one_layer_matches_records(model, batch_for):
    """With surgery on the last block only, the v-v path is x_in + out_proj(softmax(v vᵀ/√d) v)."""
    pixels, _, _ = batch_for(model, 2)
    tower, _, block, rec = last_block(model, pixels)
    with torch.no_grad():
        ctx, _ = attend(rec.v, rec.v, rec.v, None)
        x_new = rec.x_in + block.out_proj(merge_heads(ctx))
        x_new[:, 0] = rec.x_out[:, 0]  # CLS from the original path
        expected = tower.project_tokens(x_new)
        ours = surgery_tokens(tower, pixels, 1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def _ensemble(model, texts, templates):
    """Each text through every template, unit rows averaged and re-normalised (CS's ensemble)."""
    out = []
    with torch.no_grad():
        for text in texts:
            emb = F.normalize(model.text(model.tokenize([t.format(text) for t in templates]))[0], dim=-1)
            out.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(out)


def test_surgery_empty_prompt_formula(model, batch_for):
    """CS demo.py's single-text recipe: img_tok · (ensemble(caption) − ensemble(""))."""
    pixels, tokens, seeds = batch_for(model, 2)
    temps = TEMPLATES[:3]
    with torch.no_grad():
        raw = surgery_tokens(model.vision, pixels, 6)
    empty = _ensemble(model, [""], temps)[0]
    for caption_templates, text in ((True, _ensemble(model, tokens.texts, temps)),
                                    (False, F.normalize(model.text(tokens)[0], dim=-1).detach())):
        for image_norm, dim in (("tokens", 1), ("channels", -1)):
            explainer = CLIPSurgery(redundant="empty_prompt", image_norm=image_norm, caption_templates=caption_templates)
            with patch("clip_xai.explainers.surgery.TEMPLATES", temps):
                out = explainer(model, pixels, tokens, seeds)
            feats = raw / raw.norm(dim=dim, keepdim=True)
            sim = torch.einsum("bne,be->bn", feats, text - empty)
            torch.testing.assert_close(out, model.patch_map(sim), atol=1e-5, rtol=1e-4)


def _feature_surgery_written_out(feats, texts, weights):
    """CS clip_feature_surgery in full: (B,N,E) tokens, (B,T,E) texts → channel-0 map (B,N)."""
    prob = torch.einsum("bne,bte->bnt", feats, texts)
    row = prob[:, :1] if weights == "cls" else prob  # CLS row only (CS at HEAD) or every token
    p = (2 * row).softmax(-1)
    w = p / p.mean(-1, keepdim=True)
    full = feats[:, :, None] * texts[:, None] * w[..., None]  # (B,N,T,E)
    return (full - full.mean(2, keepdim=True)).sum(-1)[..., 0]


def test_feature_surgery_cls_weights_hand_case(tiny, batch_for):
    """A hand-worked case: 2 tokens, 2 texts, 2 channels, weights from the CLS row only.

    CLS f0=(1,0), patch f1=(0,1); caption t0=(1,0), class t1=(0,1). CLS probs (1,0) →
    p = softmax(2,0) = (e²,1)/(e²+1), w = 2p. sim_i = (w0·f_i·t0 − w1·f_i·t1)/2 (the mean over
    2 texts removes half of each). Patch: (0 − w1)/2 = −1/(e²+1); CLS: w0/2 = e²/(e²+1).
    With per-token weights the patch's own probs (0,1) give w=(2/(e²+1), 2e²/(e²+1)) instead.
    """
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    texts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    e2 = math.exp(2.0)
    cls = _feature_surgery_written_out(feats, texts, "cls")[0]
    torch.testing.assert_close(cls, torch.tensor([e2 / (e2 + 1), -1 / (e2 + 1)]))
    token = _feature_surgery_written_out(feats, texts, "token")[0]
    torch.testing.assert_close(token[1], torch.tensor(-e2 / (e2 + 1)))
    # The explainer's reduced formula gives the same numbers (pool index 0 = the CLS row).
    explainer = CLIPSurgery(class_names=["x"], templates="single")
    with patch.object(CLIPSurgery, "token_features", lambda self, m, px: feats), \
         patch.object(CLIPSurgery, "caption_embeddings", lambda self, m, tok: texts[:, 0]), \
         patch.object(CLIPSurgery, "auxiliary", lambda self, m: texts[0, 1:]), \
         patch.object(type(tiny), "patch_map", lambda self, sim: sim):
        pixels, tokens, _ = batch_for(tiny, 1)
        pool = patch.object(type(tiny.vision), "pool_index", lambda self, px: torch.zeros(1, dtype=torch.long))
        with pool:
            torch.testing.assert_close(explainer.explain_image(tiny, pixels, tokens, None)[0], cls)
            explainer.weights = "token"
            torch.testing.assert_close(explainer.explain_image(tiny, pixels, tokens, None)[0], token)


def test_surgery_thesis_recipe_written_out(tiny, batch_for):
    """Default = the thesis's recipe: the caption and the class names each through the templates,
    tokens normalised over the token axis, CS feature surgery with CLS-row weights, text 0."""
    pixels, tokens, seeds = batch_for(tiny, 2)
    temps, names = TEMPLATES[:4], FEW_CLASSES[:3]
    with patch("clip_xai.explainers.surgery.TEMPLATES", temps):
        out = CLIPSurgery(class_names=names)(tiny, pixels, tokens, seeds)
    with torch.no_grad():
        raw = surgery_tokens(tiny.vision, pixels, 6)
    feats = raw / raw.norm(dim=1, keepdim=True)
    caption = _ensemble(tiny, tokens.texts, temps)  # e.g. "a bad photo of a a photo of a cat."
    classes = _ensemble(tiny, names, temps)
    texts = torch.cat([caption[:, None], classes[None].expand(2, -1, -1)], 1)
    expected = _feature_surgery_written_out(feats, texts, "cls")
    torch.testing.assert_close(out, tiny.patch_map(expected), atol=1e-5, rtol=1e-4)


def test_surgery_yaml_defaults_are_the_class_defaults():
    from omegaconf import OmegaConf

    from clip_xai.config import build
    conf = REPO / "conf" / "explainer"
    built = build(OmegaConf.create({"explainer": OmegaConf.load(conf / "surgery.yaml")}), "explainer")
    assert built.config_key() == CLIPSurgery().config_key()


def test_surgery_shipped_prompt_lists():
    assert len(TEMPLATES) == 85 and len(set(TEMPLATES)) == 85 and all("{}" in t for t in TEMPLATES)
    assert len(CLASS_NAMES) == 59 and CLASS_NAMES[0] == "airplane" and CLASS_NAMES[-1] == "wood"
    assert CLIPSurgery().class_names == list(CLASS_NAMES)


def test_surgery_caption_alone_is_flagged_not_crashing(tiny, batch_for):
    """No class names: feature surgery subtracts the only text from itself (0/0 in the reference)."""
    pixels, tokens, seeds = batch_for(tiny, 2)
    out = CLIPSurgery(class_names=[], templates="single")(tiny, pixels, tokens, seeds)
    assert (out == 0).all()
    maps = image_maps(out, (224, 224))
    assert decode_flags(map_flag_codes(maps, maps)) == ["constant_clean+constant_pert"] * 2


def test_surgery_caption_too_long_for_prompts_gives_nan(tiny):
    """A caption whose templated prompts overflow the context gets a NaN map (flagged), not a crash."""
    long = " ".join(["word"] * 70)
    tokens = tiny.tokenize([long, "a photo of a cat"])
    pixels = torch.rand(2, 3, 224, 224)
    out = CLIPSurgery(class_names=FEW_CLASSES[:2], templates="ensemble")(tiny, pixels, tokens, torch.zeros(2))
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


def test_surgery_needs_caption_strings(tiny, batch_for):
    pixels, tokens, seeds = batch_for(tiny, 1)
    bare = tiny.tokens_from_ids(tokens.ids)
    with pytest.raises(ClipXaiError, match="caption strings"):
        CLIPSurgery(templates="single")(tiny, pixels, bare, seeds)
    CLIPSurgery(templates="single", caption_templates=False, class_names=FEW_CLASSES)(tiny, pixels, bare, seeds)


def test_trimmed_tokens_give_the_same_embeddings(model):
    tokens = model.tokenize(["a photo of a cat", "a dog"])
    short = tokens.trimmed()
    assert short.ids.shape[1] < tokens.ids.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(short), model.encode_text(tokens), atol=1e-6, rtol=1e-5)


def test_surgery_rejects_bad_settings(tiny):
    with pytest.raises(ClipXaiError):
        CLIPSurgery(redundant="nope")
    with pytest.raises(ClipXaiError):
        CLIPSurgery(weights="mean")
    with pytest.raises(ClipXaiError):
        CLIPSurgery(surgery_layers=99).check_model(tiny)
    with pytest.raises(ClipXaiError):
        CLIPSurgery(modality="text")


# --- RISE -------------------------------------------------------------------------------------


def test_rise_masks_seeded_cached_and_in_range():
    cpu = torch.device("cpu")
    explainer = RISE(n_masks=128, s=8, p1=0.5, mask_seed=3)
    masks = explainer.image_masks((224, 224), cpu)
    assert explainer.image_masks((224, 224), cpu) is masks  # cached, not redrawn
    full = masks.full()
    assert full.shape == (128, 224, 224)
    assert full.min() >= 0 and full.max() <= 1
    assert abs(full.mean().item() - 0.5) < 0.05
    same = RISE(n_masks=128, s=8, p1=0.5, mask_seed=3).image_masks((224, 224), cpu)
    assert torch.equal(same.full(), full)
    other = RISE(n_masks=128, s=8, p1=0.5, mask_seed=4).image_masks((224, 224), cpu)
    assert not torch.equal(other.full(), full)
    unseeded = RISE(n_masks=8, mask_seed=None)  # reference behaviour: fresh masks every call
    assert not torch.equal(unseeded.image_masks((64, 64), cpu).full(), unseeded.image_masks((64, 64), cpu).full())
    text = explainer.text_masks(cpu)
    m5 = text.for_length(5)
    assert m5.shape == (200, 5) and m5.min() >= 0 and m5.max() <= 1
    assert text.for_length(5) is m5 and explainer.text_masks(cpu) is text


def test_rise_upsampling_matches_skimage():
    resize = pytest.importorskip("skimage.transform").resize
    explainer = RISE(n_masks=4, mask_seed=0)
    masks = explainer.image_masks((224, 224), torch.device("cpu"))
    full = masks.full().numpy()
    for i in range(4):
        x, y = masks.offsets[i].tolist()
        ref = resize(masks.grid[i].numpy(), (9 * 28, 9 * 28), order=1, mode="reflect", anti_aliasing=False)
        assert abs(full[i] - ref[x : x + 224, y : y + 224]).max() < 1e-5
    w = interp_matrix(8, 18, dtype=torch.float64).numpy()
    g = masks.grid[0, 0].numpy()
    assert abs(w @ g - resize(g, (18,), order=1, mode="reflect", anti_aliasing=False)).max() < 1e-6


def test_rise_same_masks_for_clean_and_perturbed(tiny, monkeypatch):
    explainer = RISE(n_masks=12, chunk=5, mask_seed=0)
    used, masked_inputs = [], []
    real_masks = explainer.image_masks

    def spy_masks(size, device):
        m = real_masks(size, device)
        used.append(m)
        return m

    def fake_scores(model, masked, target):
        masked_inputs.append(masked.clone())
        return masked.mean(dim=(2, 3, 4))

    monkeypatch.setattr(explainer, "image_masks", spy_masks)
    monkeypatch.setattr(explainer, "_image_scores", fake_scores)
    tokens = tiny.tokenize(["a dog"])
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(1, 3, 224, 224, generator=gen)
    perturbed = (clean + 0.03 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
    explainer(tiny, clean, tokens)
    explainer(tiny, perturbed, tokens)
    assert len(used) == 2 and used[0] is used[1]
    full = used[0].full()
    mean = tiny.vision.mean[:, None]
    for call, x in enumerate((clean, perturbed)):
        got = torch.cat(masked_inputs[3 * call : 3 * call + 3], dim=1)  # 3 chunks: 5 + 5 + 2 masks
        expected = mean + full[None, :, None] * (x[:, None] - mean)
        torch.testing.assert_close(got, expected)


def test_rise_hand_worked_left_half(tiny, monkeypatch):
    """Score = mean of the masked image's left half → saliency is higher on the left."""
    explainer = RISE(n_masks=256, chunk=64, mask_seed=0)
    monkeypatch.setattr(explainer, "_image_scores", lambda model, masked, target: masked[..., :112].mean(dim=(2, 3, 4)))
    pixels = torch.ones(2, 3, 224, 224)
    sal = explainer(tiny, pixels, tiny.tokenize(["a", "b"]))
    assert sal.shape == (2, 224, 224)
    left, right = sal[:, :, :112].mean(dim=(1, 2)), sal[:, :, 112:].mean(dim=(1, 2))
    assert (left > right + 0.01).all()
    # far from the boundary the map is flat on each side up to mask noise; the centre rows agree
    assert sal[:, :, :80].mean() > sal[:, :, 144:].mean()


def test_rise_text_hand_worked(tiny, monkeypatch):
    """Text score = mask value at the first caption token → that token gets the highest saliency."""
    explainer = RISE(modality="text", n_masks_text=256, chunk=64, mask_seed=0)

    def fake(model, tokens, mult, target):
        return mult[:, :, 1]

    monkeypatch.setattr(explainer, "_text_scores", fake)
    tokens = tiny.tokenize(["a big red dog runs on the green grass today"])
    sal = explainer(tiny, torch.rand(1, 3, 224, 224), tokens)[0]
    content = tokens.content_mask[0]
    assert sal[~content].abs().max() == 0
    assert sal[content].argmax().item() == 0  # position 1 is the first content token


def test_rise_chunk_auto_rules_and_bad_chunk(tiny, batch_for):
    cpu, cuda, mib = torch.device("cpu"), torch.device("cuda"), 2**20
    # hand count: bytes of one input in one block = (16·N·D + heads·N²)·element size
    tiny_bytes = (16 * 197 * 64 + 2 * 197**2) * 4
    assert activation_bytes(197, 64, 2, 4) == tiny_bytes
    # CPU: at least 3072 token rows per pass (16 images of 197 tokens; ViT-B/16 overflows a 32 MiB
    # cache with one image, and the tiny model fits 15 in half of it) ...
    assert (16 * mib) // tiny_bytes == 15
    assert auto_chunk(cpu, 197, 64, 2, 0, 4, cache_bytes=32 * mib) == 16
    assert auto_chunk(cpu, 197, 768, 12, 0, 4, cache_bytes=32 * mib) == 16
    assert auto_chunk(cpu, 577, 1024, 16, 0, 4, cache_bytes=32 * mib) == 6  # ViT-L/14 at 336 px
    # ... more while half the cache holds them (a 64 MiB cache: 30 tiny images), at most 64
    assert auto_chunk(cpu, 197, 64, 2, 0, 4, cache_bytes=64 * mib) == (32 * mib) // tiny_bytes == 30
    assert auto_chunk(cpu, 197, 64, 2, 0, 4, cache_bytes=4096 * mib) == 64
    # CUDA: half the free memory over activations + pixel copies, at most 1000 (ViT-B/16 in bf16)
    per = (16 * 197 * 768 + 12 * 197**2) * 2 + 3 * 3 * 224 * 224 * 4
    assert auto_chunk(cuda, 197, 768, 12, 3 * 3 * 224 * 224 * 4, 2, free_bytes=4 * 2**30) == 2**31 // per == 283
    assert auto_chunk(cuda, 197, 768, 12, 0, 2, free_bytes=80 * 2**30) == 1000
    assert auto_chunk(cuda, 197, 768, 12, 0, 4, free_bytes=1000) == 1  # never zero
    # the explainer asks with the explained tower's size, and keeps its choice
    rise = RISE()
    assert rise.chunk == "auto"
    expected = auto_chunk(cpu, 197, 64, 2, 3 * 3 * 224 * 224 * 4, 4)
    assert rise.chunk_size(tiny, cpu) == expected and rise.chunk_size(tiny, cpu) == expected
    text = RISE(modality="text").chunk_size(tiny, cpu)
    assert text == auto_chunk(cpu, 77, 64, 2, 0, 4)
    assert RISE.per_pass(1, 16) == 16 and RISE.per_pass(4, 16) == 4 and RISE.per_pass(16, 5) == 1
    # maps do not depend on the chunk
    pixels, tokens, seeds = batch_for(tiny, 1)
    torch.testing.assert_close(RISE(n_masks=6, chunk=4)(tiny, pixels, tokens, seeds),
                               RISE(n_masks=6)(tiny, pixels, tokens, seeds), rtol=0, atol=1e-6)
    for bad in (0, -3, "big"):
        with pytest.raises(ClipXaiError, match="chunk"):
            RISE(chunk=bad)


def test_rise_compiled_forward_gives_the_eager_maps(tiny, batch_for):
    """compile=true runs the padded static-shape path through torch.compile. Inductor needs minutes
    on a 2-core CPU, so the test traces with the ``eager`` backend: same graph capture, padding and
    reuse, no code generation."""
    pixels, tokens, seeds = batch_for(tiny, 1)
    eager = RISE(n_masks=6, chunk=4, compile=False)
    compiled = RISE(n_masks=6, chunk=4, compile=True, compile_backend="eager")  # passes of 4 + 2 (padded) masks
    assert not RISE().uses_compile(torch.device("cuda"))  # opt-in
    auto = RISE(compile="auto")
    assert not auto.uses_compile(torch.device("cpu")) and auto.uses_compile(torch.device("cuda"))
    torch.testing.assert_close(compiled(tiny, pixels, tokens, seeds), eager(tiny, pixels, tokens, seeds),
                               rtol=0, atol=1e-6)
    assert len(compiled._compiled) == 1 and next(iter(compiled._compiled.values()))[1] == 4
    with pytest.raises(ClipXaiError, match="compile"):
        RISE(compile="sometimes")


def test_rise_compiler_failure_falls_back_to_eager_with_a_warning(tiny, batch_for, caplog):
    pixels, tokens, seeds = batch_for(tiny, 1)
    broken = RISE(n_masks=4, chunk=4, compile=True, compile_backend="no_such_backend")
    with caplog.at_level(logging.WARNING, logger="clip_xai"):
        maps = broken(tiny, pixels, tokens, seeds)
    assert "torch.compile failed" in caplog.text and "explainer.compile=false" in caplog.text
    torch.testing.assert_close(maps, RISE(n_masks=4, chunk=4, compile=False)(tiny, pixels, tokens, seeds),
                               rtol=0, atol=1e-6)
    assert next(iter(broken._compiled.values()))[0] is None  # not retried on the next pass


def test_rise_reports_progress_with_the_job_eta(tiny, batch_for, capsys, monkeypatch):
    from clip_xai import progress

    pixels, tokens, seeds = batch_for(tiny, 1)
    monkeypatch.setenv("CLIP_XAI_PROGRESS", "1")
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    with progress.Job(3, "rise"):
        RISE(n_masks=8, chunk=2)(tiny, pixels, tokens, seeds)
    err = capsys.readouterr().err
    assert "rise" in err and "8/8" in err and "mask" in err and "job ETA ≥" in err
    monkeypatch.setenv("CLIP_XAI_PROGRESS", "0")
    RISE(n_masks=4, chunk=2)(tiny, pixels, tokens, seeds)
    assert "mask" not in capsys.readouterr().err
