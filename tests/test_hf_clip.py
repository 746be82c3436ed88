"""model=hf_clip: the block-by-block towers against transformers' CLIPModel (small random configs),
and one random open_clip ViT-B-32-quickgelu-shaped model converted to CLIPModel giving the same
maps for every explainer on both backends."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import open_clip
import pytest
import torch
from torch import Tensor

from clip_xai.config import build
from clip_xai.errors import ClipXaiError
from clip_xai.explainers.postprocess import image_maps, text_maps
from clip_xai.models import weights
from clip_xai.models.hf_clip import HfClipAdapter, hf_clip_from_open_clip
from clip_xai.models.openclip import OpenClipAdapter
from tests.helpers import compose_cfg, hf_normalised, recorded_and_native_grads

CAPTIONS = ["a photo of a cat", "dog", "two birds on a wire, at dusk"]
TOL = 1e-5
SMALL = {"vision": {"num_hidden_layers": 2}, "text": {"num_hidden_layers": 2}}


@pytest.fixture(scope="module")
def hf() -> HfClipAdapter:
    return HfClipAdapter("hf-clip-2", pretrained=False, seed=0, config_overrides=SMALL)


@pytest.fixture(scope="module")
def pixels() -> Tensor:
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))




def _dev(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def test_config_and_attributes(hf):
    assert (hf.image_size, hf.patch_size, hf.grid) == (224, 32, (7, 7))
    assert hf.vision.n_layers == hf.text.n_layers == 2 and hf.vision.n_heads == 2
    assert hf.model.config._attn_implementation == "eager"
    assert (hf.context_length, hf.pad_id, hf.eos_id, hf.mask_token_id, hf.text_mask_rule) == (77, 49407, 49407, 0, "mask_id")
    assert hf.vision.provides == hf.text.provides == {"blocks", "attention", "pooled_token", "token_head"}


def test_tokens_equal_open_clip_up_to_eos(hf, tiny):
    ours, theirs = hf.tokenize(CAPTIONS), tiny.tokenize(CAPTIONS)
    assert torch.equal(ours.pool_index, theirs.pool_index)
    assert torch.equal(ours.content_mask, theirs.content_mask)
    keep = torch.arange(77)[None] <= ours.pool_index[:, None]
    assert torch.equal(ours.ids[keep], theirs.ids[keep])
    assert ours.ids[~keep].eq(49407).all() and theirs.ids[~keep].eq(0).all()  # HF pads with EOS, open_clip with 0


@pytest.mark.adapter
def test_forwards_match_native(hf, pixels):
    native = hf.model.get_image_features(pixel_values=hf_normalised(hf, pixels)).pooler_output
    assert _dev(hf.vision(pixels)[0], native) < TOL
    tokens = hf.tokenize(CAPTIONS)
    ours, _ = hf.text(tokens)
    for mask in (tokens.attention_mask, None):  # the padding mask never reaches the EOS state
        native = hf.model.get_text_features(input_ids=tokens.ids, attention_mask=mask).pooler_output
        assert _dev(ours, native) < TOL
    for i, caption in enumerate(CAPTIONS):  # no dependence on batch mates
        assert _dev(hf.text(hf.tokenize([caption]))[0][0], ours[i]) < TOL


@pytest.mark.adapter
def test_records_and_token_projections_match_native(hf, pixels):
    n = hf.vision.n_layers
    _, recs = hf.vision(pixels, record=range(n))
    out = hf.model.vision_model(pixel_values=hf_normalised(hf, pixels), output_attentions=True, output_hidden_states=True)
    for i in range(n):
        assert recs[i].probs.shape == out.attentions[i].shape == (2, 2, 50, 50)
        assert _dev(recs[i].probs, out.attentions[i]) < TOL
        assert _dev(recs[i].x_in, out.hidden_states[i]) < TOL
    xv, _ = hf.vision.run(*hf.vision.embed(pixels))
    native = hf.model.visual_projection(hf.model.vision_model.post_layernorm(out.last_hidden_state))
    assert _dev(hf.vision.project_tokens(xv), native) < TOL

    tokens = hf.tokenize(CAPTIONS)
    x, recs = hf.text(tokens, record=range(n))
    out = hf.model.text_model(input_ids=tokens.ids, attention_mask=tokens.attention_mask, output_attentions=True,
                              output_hidden_states=True)
    upto = tokens.attention_mask.bool()  # positions up to EOS: identical with or without the padding mask
    for i in range(n):
        assert _dev(recs[i].probs[upto[:, None, :, None].expand_as(recs[i].probs)],
                    out.attentions[i][upto[:, None, :, None].expand_as(out.attentions[i])]) < TOL
        assert _dev(recs[i].x_out[upto], out.hidden_states[i + 1][upto]) < TOL
        assert recs[i].probs.triu(1).abs().max().item() == 0.0  # causal
    xt, bias = hf.text.embed(tokens)
    xt, _ = hf.text.run(xt, bias)
    native = hf.model.text_projection(out.last_hidden_state)  # last_hidden_state is after final_layer_norm
    assert _dev(hf.text.project_tokens(xt)[upto], native[upto]) < TOL




# Float32 chains of the same operations in another association order: measured 1e-7 to 1e-6
# relative to the gradient's largest entry (see test_altclip.GRAD_RTOL).
GRAD_RTOL = 1e-5


@pytest.mark.adapter
def test_recorded_and_fused_paths_agree_with_gradients(hf, pixels):
    """Split run = fused run; the recorded attention and the embedding carry the native gradients.

    Targets are random weightings (a softmax row sum would be constant). Text: only query rows up
    to EOS are weighted (rows after it are padding, which the two paths mask differently); the
    gradient is taken at the token-embedding table, the leaf both paths share.
    """
    tokens = hf.tokenize(CAPTIONS)
    table = hf.model.text_model.embeddings.token_embedding.weight
    for kind, tower, inputs in (("vision", hf.vision, pixels), ("text", hf.text, tokens)):
        fused, _ = tower(inputs)
        x, bias = tower.embed(inputs)
        y, recs = tower.run(x, bias, record=(-1,), heads={-1: 1})
        assert recs[tower.n_layers - 1].probs.shape[1] == 1
        y, recs = tower.run(x, bias, record=(-1,))
        assert _dev(fused, tower.pool(y, inputs)) < TOL
        for target in ("embedding", "probs"):
            recorded, native = recorded_and_native_grads(hf, kind, target, pixels, tokens, table, mask_padded_queries=True)
            scale = native.abs().max().item()
            assert scale > 1e-3, (kind, target, scale)  # a real gradient, far above rounding
            assert _dev(recorded, native) <= GRAD_RTOL * scale, (kind, target, _dev(recorded, native) / scale)


@pytest.mark.adapter
def test_seeded_save_and_reload(hf, pixels, tmp_path):
    again = HfClipAdapter("b", pretrained=False, seed=0, config_overrides=SMALL)
    other = HfClipAdapter("c", pretrained=False, seed=1, config_overrides=SMALL)
    assert torch.equal(again.encode_image(pixels), hf.encode_image(pixels))
    assert not torch.allclose(other.encode_image(pixels), hf.encode_image(pixels))
    hf.save_pretrained(tmp_path / "clip")
    reloaded = HfClipAdapter("r", pretrained=str(tmp_path / "clip"))
    tokens = hf.tokenize(CAPTIONS)
    assert torch.equal(reloaded.tokenize(CAPTIONS).ids, tokens.ids)
    assert torch.equal(reloaded.encode_image(pixels), hf.encode_image(pixels))
    assert torch.equal(reloaded.encode_text(tokens), hf.encode_text(tokens))


def test_offline_missing_and_bad_inputs(hf, monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "hub_reachable", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(ClipXaiError) as err:
        HfClipAdapter("clip", repo_id="openai/clip-vit-large-patch14", pretrained=True, cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    assert "openai/clip-vit-large-patch14" in str(err.value) and "model=tiny" in str(err.value)
    with pytest.raises(ClipXaiError, match="does not exist"):
        HfClipAdapter("clip", pretrained=str(tmp_path / "nowhere"))
    with pytest.raises(ClipXaiError, match="only apply to random"):
        HfClipAdapter("clip", pretrained=str(tmp_path), config_overrides=SMALL)
    with pytest.raises(ClipXaiError, match="too long"):
        hf.tokenize(["word " * 80])
    with pytest.raises(ClipXaiError, match="224"):
        hf.encode_image(torch.rand(1, 3, 112, 112))


# --- the same network on both backends ----------------------------------------------------------

B32_SMALL = {  # ViT-B-32-quickgelu structure (patch 32 at 224 px, QuickGELU, CLS pooling), 4 blocks of width 64
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
}


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[OpenClipAdapter, HfClipAdapter]:
    """A random open_clip ViT-B-32-quickgelu-shaped model and its key-mapped CLIPModel, saved and
    reloaded through the real hf_clip loading path (pretrained=<dir>)."""
    folder = tmp_path_factory.mktemp("b32")
    (folder / "b32-small.json").write_text(json.dumps(B32_SMALL))
    open_clip.add_model_config(folder / "b32-small.json")
    oc = OpenClipAdapter("oc", "b32-small", seed=3)
    converted = hf_clip_from_open_clip(oc.model)
    processor_src = HfClipAdapter("tmp", pretrained=False, config_overrides=SMALL)
    converted.save_pretrained(str(folder / "hf"))
    processor_src._processor.save_pretrained(str(folder / "hf"))
    return oc, HfClipAdapter("hf", pretrained=str(Path(folder / "hf")))


@pytest.mark.adapter
def test_converted_model_embeds_identically(twins, sample_images):
    oc, hf = twins
    pixels, captions = sample_images
    assert _dev(oc.encode_image(pixels), hf.encode_image(pixels)) < 1e-5
    assert _dev(oc.encode_text(oc.tokenize(list(captions))), hf.encode_text(hf.tokenize(list(captions)))) < 1e-5
    native = hf.model.get_image_features(pixel_values=hf_normalised(hf, pixels)).pooler_output
    assert _dev(native, oc.model.encode_image(hf_normalised(oc, pixels))) < 1e-5


# Small settings (the maps only need to agree): layers inside 4 blocks, few masks, steps and copies.
FAST = {"rise": ["explainer.n_masks=32", "explainer.n_masks_text=16", "explainer.chunk=32"],
        "m2ib": ["explainer.steps=2", "explainer.copies=2", "explainer.layer=2"],
        "abm": ["explainer.steps=2", "explainer.noise_samples=2", "explainer.target_layer=2"],
        "mfaba": ["explainer.steps=2"], "surgery": ["explainer.templates=single", "explainer.surgery_layers=2"],
        "eclip": ["explainer.text_layers=4"], "selfattn": ["explainer.text_layers=4"],
        "gem": ["explainer.layers=2"], "interactions": ["explainer.steps=2"]}
FAST.update({f"{name}_nib": FAST.get(name, []) for name in ("rise", "mfaba", "saliency", "fastig")},
            surgery_demo=FAST["surgery"])


def _cases() -> list[tuple[str, str]]:
    from clip_xai.paths import CONF_DIR

    cases = []
    for path in sorted((Path(CONF_DIR) / "explainer").glob("*.yaml")):
        cls = build(compose_cfg([f"explainer={path.stem}", "model=tiny"]), "explainer")
        cases += [(path.stem, m) for m in sorted(type(cls).modalities)]
    return cases


@pytest.mark.parametrize("name,modality", _cases())
def test_every_explainer_gives_the_same_maps_on_both_backends(twins, sample_images, name, modality):
    oc, hf = twins
    pixels, captions = sample_images[0][1:2], list(sample_images[1][1:2])
    seeds = torch.tensor([11])
    ids = oc.tokenize(captions).ids  # the same ids on both (HF pads with EOS, open_clip with 0; eclip's
    # reference ksim min-max spans the padded positions, so its text maps see the pad id)
    cfg = compose_cfg([f"explainer={name}", "model=tiny", f"explainer.modality={modality}", *FAST.get(name, [])])
    maps = []
    for model in (oc, hf):
        explainer = build(cfg, "explainer")  # fresh: no per-model caches shared
        tokens = replace(model.tokens_from_ids(ids), texts=tuple(captions))  # Surgery re-prompts the caption
        raw = explainer(model, pixels, tokens, seeds)
        maps.append(image_maps(raw, (224, 224)) if modality == "image" else text_maps(raw, tokens.content_mask))
    assert maps[0].shape == maps[1].shape
    assert torch.isfinite(maps[0]).all() and maps[0].abs().sum() > 0
    assert _dev(maps[0], maps[1]) < 1e-3, (name, modality)
