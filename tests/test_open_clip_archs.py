"""model=open_clip on any open_clip CLIP: every named ViT config (shrunk to a few small random blocks,
keeping its pooling, norms, layer scale, image and patch size, text pooling and masks) runs through
the adapter with the native forward's embeddings; variant towers declare what they lack."""
from __future__ import annotations

import copy
import json

from pathlib import Path

import open_clip
import pytest
import torch

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.game import GAME
from clip_xai.explainers.m2ib import M2IB
from clip_xai.explainers.maskclip import MaskCLIP
from clip_xai.explainers.rise import RISE
from clip_xai.explainers.saliency import Saliency
from clip_xai.models.openclip import OpenClipAdapter, config_image_size

TOL = 1e-5


def _vit_configs() -> list[str]:
    """open_clip's named CLIPs with its own ViT and text transformer (not timm / HF / ResNet). Only the
    configs open_clip ships: other tests register small configs in the same process-wide registry."""
    shipped = {p.stem for p in (Path(open_clip.__file__).parent / "model_configs").glob("*.json")}
    names = []
    for name in sorted(set(open_clip.list_models()) & shipped):
        cfg = open_clip.get_model_config(name) or {}
        v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if "timm_model_name" in v or "hf_model_name" in t or not isinstance(v.get("layers"), int):
            continue
        if name.startswith("coca") or "multimodal_cfg" in cfg:
            continue
        names.append(name)
    return names


def _shrunk(cfg: dict) -> dict:
    """Same structure, small: 2 blocks, width 32/2 heads in both towers, embed 32, small vocab."""
    cfg = copy.deepcopy(cfg)
    cfg["embed_dim"] = 32
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    v.update(layers=2, width=32, head_width=16)
    v.pop("mlp_ratio", None)
    if v.get("attentional_pool"):
        v.update(attn_pooler_heads=2, attn_pooler_queries=4)
    t.update(layers=2, width=32, heads=2, vocab_size=min(int(t.get("vocab_size", 49408)), 49408))
    t.pop("mlp_ratio", None)
    return cfg


def _register(tmp_path_factory, name: str, cfg: dict) -> str:
    path = tmp_path_factory.mktemp("cfg") / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


def _ids(adapter: OpenClipAdapter, n: int = 2) -> torch.Tensor:
    """Hand-made ids: random tokens, the pooled end token at position 5, padding after it."""
    text = adapter.text
    vocab = text.src.token_embedding.num_embeddings
    ids = torch.randint(1, vocab - 2, (n, adapter.context_length), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = vocab - 2
    ids[:, 5] = text.eos_id if text.pool_type == "eos" else vocab - 1
    ids[:, 6:] = text.pad_id
    return ids


def _check_native(adapter: OpenClipAdapter) -> None:
    size = adapter.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    native = adapter.model.encode_image((pixels - adapter.vision.mean) / adapter.vision.std)
    ours, _ = adapter.vision(pixels, record=range(adapter.vision.n_layers))
    assert (ours - native).abs().max().item() < TOL
    tokens = adapter.tokens_from_ids(_ids(adapter))
    native = adapter.model.encode_text(tokens.ids)
    ours, recs = adapter.text(tokens, record=(0,))
    assert (ours - native).abs().max().item() < TOL
    assert torch.allclose(recs[0].probs.sum(-1), torch.ones(()), atol=1e-5)


def _structures() -> dict[str, list[str]]:
    """Named configs grouped by structure once shrunk (all but image and patch size equal)."""
    groups: dict[str, list[str]] = {}
    for name in _vit_configs():
        cfg = _shrunk(open_clip.get_model_config(name))
        for key in ("image_size", "patch_size"):
            cfg["vision_cfg"].pop(key)
        groups.setdefault(json.dumps(cfg, sort_keys=True), []).append(name)
    return {names[0]: names for names in groups.values()}


def _build_shrunk(arch: str, tmp_path_factory) -> OpenClipAdapter:
    name = _register(tmp_path_factory, f"shrunk-{arch}", _shrunk(open_clip.get_model_config(arch)))
    return OpenClipAdapter(name, name, seed=0)


def test_every_named_open_clip_vit_builds_with_its_grid(tmp_path_factory):
    """All of open_clip's named ViT CLIPs (S/M/B/L/H/g/bigG/e, quickgelu, plus, 224-378 px, CLIPA,
    worldwide): image size and patch grid come from the model; average-pooled ones lack the class token."""
    names = _vit_configs()
    assert {"ViT-S-16", "ViT-B-32-quickgelu", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-B-16-plus-240",
            "ViT-M-16", "ViT-L-14-CLIPA"} <= set(names)
    for arch in names:
        v = open_clip.get_model_config(arch)["vision_cfg"]
        adapter = _build_shrunk(arch, tmp_path_factory)
        size = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
        assert adapter.image_size == size == config_image_size(arch), arch
        assert adapter.grid == (size // v["patch_size"],) * 2, arch
        assert adapter.vision.n_layers == adapter.text.n_layers == 2
        assert ("pooled_token" in adapter.vision.provides) == (v.get("pool_type", "tok") == "tok"), arch


@pytest.mark.adapter
@pytest.mark.parametrize("arch", sorted(_structures()))
def test_each_named_structure_matches_native(arch, tmp_path_factory):
    """One named config per structure (pooling, norms, quickgelu, text pooling/mask): recomputed = native."""
    _check_native(_build_shrunk(arch, tmp_path_factory))


VARIANTS = {
    # ViT-S-16 shape at a non-14x14 grid (112 px / 14 = 8x8), layer scale, no ln_pre
    "t-ls-grid8": {"vision_cfg": {"image_size": 112, "patch_size": 14, "ls_init_value": 0.5, "no_ln_pre": True},
                   "text_cfg": {"ls_init_value": 0.5}},
    # CLIPA-style average pooling with the norm after pooling; bidirectional text pooled at the last position
    "t-avg": {"vision_cfg": {"pool_type": "avg", "final_ln_after_pool": True},
              "text_cfg": {"no_causal_mask": True, "pool_type": "last"}},
    # CoCa-style attentional pooler on top of the ViT
    "t-attnpool": {"vision_cfg": {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}},
    # CustomTextCLIP text tower: bidirectional, pooled at the first token, Linear projection with bias
    "t-customtext": {"custom_text": True, "text_cfg": {"no_causal_mask": True, "pool_type": "first",
                                                       "proj_bias": True}},
    # a ResNet image tower (run as one piece)
    "t-resnet": {"vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None}},
}


def _variant(tmp_path_factory, key: str) -> OpenClipAdapter:
    base = {"embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    extra = VARIANTS[key]
    for k, val in extra.items():
        if isinstance(val, dict):
            base[k].update(val)
        else:
            base[k] = val
    base["vision_cfg"] = {k: v for k, v in base["vision_cfg"].items() if v is not None}
    name = _register(tmp_path_factory, key, base)
    return OpenClipAdapter(key, name, seed=0)


@pytest.mark.adapter
@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_variants_match_native_and_declare_what_they_lack(key, tmp_path_factory):
    adapter = _variant(tmp_path_factory, key)
    missing = set(adapter.vision.missing)
    expected = {"t-ls-grid8": set(), "t-avg": {"pooled_token"}, "t-attnpool": {"pooled_token", "token_head"},
                "t-customtext": set(), "t-resnet": {"blocks", "attention", "pooled_token", "token_head"}}[key]
    assert missing == expected
    if key == "t-resnet":
        pixels = torch.rand(2, 3, 64, 64)
        native = adapter.model.encode_image((pixels - adapter.vision.mean) / adapter.vision.std)
        assert (adapter.vision(pixels)[0] - native).abs().max().item() < TOL
        tokens = adapter.tokens_from_ids(_ids(adapter))
        assert (adapter.text(tokens)[0] - adapter.model.encode_text(tokens.ids)).abs().max().item() < TOL
        with pytest.raises(ClipXaiError, match="no patch grid"):
            adapter.grid
    else:
        _check_native(adapter)
    if key == "t-ls-grid8":
        assert adapter.grid == (8, 8) and adapter.vision.blocks[0].block.ls_1.gamma.eq(0.5).all()
        assert isinstance(adapter.model.visual.ln_pre, torch.nn.Identity)


def test_requirement_errors_name_method_model_and_missing(tmp_path_factory, sample_images):
    """A method needing the class token gets ONE start-up error on an average-pooled or ResNet model;
    methods needing only the embedding run on them."""
    avg, resnet = _variant(tmp_path_factory, "t-avg"), _variant(tmp_path_factory, "t-resnet")
    pixels = torch.nn.functional.interpolate(sample_images[0][:1], size=64, mode="bilinear")
    tokens = avg.tokenize(["a cat"])
    for model, explainer, missing in ((avg, GAME(), "pooled_token"), (avg, MaskCLIP(), "pooled_token"),
                                      (resnet, M2IB(), "blocks"), (resnet, Saliency(variant="attention"), "attention")):
        with pytest.raises(ClipXaiError) as err:
            explainer.check_requirements(model)
        msg = str(err.value)
        assert explainer.name in msg and model.name in msg and missing in msg and "fix:" in msg
        with pytest.raises(ClipXaiError, match="cannot run on model"):  # also before any work in __call__
            explainer(model, pixels, tokens)
    # what they have is enough for these
    M2IB(copies=2, steps=2).check_requirements(avg)
    Saliency(modality="text").check_requirements(resnet)
    rise = RISE(n_masks=8, s=4, chunk=8)
    rise.check_requirements(resnet)
    assert rise(resnet, pixels, resnet.tokenize(["a cat"])).shape == (1, 64, 64)


def test_requirements_follow_settings():
    assert Saliency().requirements() == frozenset()
    assert Saliency(variant="attention").requirements() == {"attention", "pooled_token"}
    assert Saliency(modality="text").requirements() == {"blocks"}
    assert RISE().requirements() == frozenset() and RISE(modality="text").requirements() == {"blocks"}


def test_missing_checkpoint_path_and_unknown_tag(tmp_path, monkeypatch):
    with pytest.raises(ClipXaiError, match="does not exist"):
        OpenClipAdapter("x", "tiny", pretrained=str(tmp_path / "nope.pt"))
    monkeypatch.setattr("clip_xai.models.weights.hub_reachable", lambda *a, **k: False)
    with pytest.raises(ClipXaiError, match="no pretrained tag"):
        OpenClipAdapter("x", "ViT-L-14", pretrained="no-such-tag")
    with pytest.raises(ClipXaiError) as err:
        OpenClipAdapter("x", "ViT-L-14-336", pretrained="openai", cache_dir=str(tmp_path))
    assert "ViT-L-14-336" in str(err.value) and "model=tiny" in str(err.value)
