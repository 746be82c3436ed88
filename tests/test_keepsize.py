"""model.keep_size: images at their own size with the learned positions interpolated to the input's
patch grid (Grad-ECLIP's ``imgprocess_keepsize`` + ``clip_encode_dense``), on both backends.

Checked against: the fixed-size path at the model's own size (bit-equal), a bicubic interpolation
written out here with numpy (Keys' kernel, a = −0.75, half-pixel centres, clamped borders), the
backends' own interpolations (transformers' ``interpolate_pos_encoding``, open_clip's
``resize_pos_embed`` with ``antialias=False``) and PIL for the preprocessing geometry. Models are
small and random (never pretrained).
"""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip_xai.config import build
from clip_xai.errors import ClipXaiError
from clip_xai.explainers.eclip import GradECLIP
from clip_xai.explainers.postprocess import image_maps
from clip_xai.explainers.selfattn import SelfAttention
from clip_xai.models.altclip import AltClipAdapter
from clip_xai.models.base import input_size, interpolate_positions
from clip_xai.models.hf_clip import HfClipAdapter
from clip_xai.models.openclip import CONFIG_DIR, OpaqueVision, OpenClipAdapter
from clip_xai.models.preprocess import cap_short_side, keep_size_pixels, keep_size_shape
from tests.helpers import compose_cfg, hf_normalised

H, W = 160, 256  # 10×16 patches of 16 px, 5×8 of 32 px
SMALL = {"vision": {"num_hidden_layers": 2}, "text": {"num_hidden_layers": 2}}
CHEAP = {  # the fewest steps/masks that still run every code path
    "rise": ["explainer.n_masks=16"], "rise_nib": ["explainer.n_masks=16"],
    "m2ib": ["explainer.steps=2", "explainer.copies=2"], "abm": ["explainer.steps=2", "explainer.noise_samples=2"],
    "interactions": ["explainer.steps=2"], "mfaba": ["explainer.steps=2"], "mfaba_nib": ["explainer.steps=2"],
    "surgery": ["explainer.templates=single", "explainer.class_names=[dog,grass]"],
    "surgery_demo": ["explainer.templates=single"],
}
EXPLAINERS = sorted(p.stem for p in (CONFIG_DIR.parents[2] / "conf" / "explainer").glob("*.yaml"))


@pytest.fixture(scope="module")
def keep():
    """The tiny open_clip model (same seed as the session ``tiny``) in keep-size mode."""
    return OpenClipAdapter("tiny", "tiny", seed=0, keep_size=True)


@pytest.fixture(scope="module")
def hf_pair():
    """A 2-block random HF CLIP (patch 32) in fixed and keep-size mode, same weights."""
    return (HfClipAdapter("hf", pretrained=False, seed=0, config_overrides=SMALL),
            HfClipAdapter("hf", pretrained=False, seed=0, config_overrides=SMALL, keep_size=True))


@pytest.fixture(scope="module")
def altclip_keep():
    return AltClipAdapter("altclip_tiny", pretrained=False, seed=0, keep_size=True)


@pytest.fixture(scope="module")
def odd_pixels():
    return torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3))


def _keys_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """(n_out, n_in) 1-D bicubic resampling written out: source x = (i + ½)·n_in/n_out − ½, Keys'
    cubic convolution weights of the four nearest samples, indices clamped at the borders."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        x0 = int(np.floor(x))
        for j in range(x0 - 1, x0 + 3):
            d = abs(x - j)
            w = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
            m[i, min(max(j, 0), n_in - 1)] += w
    return m


def _positions(model, pixels) -> torch.Tensor:
    """The positions the tower added: its input embedding minus class token and patch projection."""
    v = model.model.visual
    with torch.no_grad():
        e, _ = model.vision.input_embedding(pixels)
        x = v.conv1(model.vision.normalise(pixels)).flatten(2).transpose(1, 2)
    return (e[0] - torch.cat([v.class_embedding[None], x[0]])).double()


def test_native_size_is_the_fixed_path(tiny, keep, altclip_tiny, altclip_keep, hf_pair, sample_images, batch_for):
    pixels, tokens, seeds = batch_for(tiny, 2)
    for fixed, kept in ((tiny, keep), (altclip_tiny, altclip_keep), hf_pair):
        assert (kept.keep_size, fixed.keep_size, kept.grid_for(pixels)) == (True, False, fixed.grid)
        with torch.no_grad():
            assert torch.equal(fixed.encode_image(pixels), kept.encode_image(pixels))
    toks = keep.tokenize(list(sample_images[1][:2]))
    assert torch.equal(GradECLIP()(tiny, pixels, tokens, seeds), GradECLIP()(keep, pixels, toks, seeds))
    table = keep.model.visual.positional_embedding
    assert interpolate_positions(table, 1, (14, 14), (14, 14)) is table


def test_positions_equal_bicubic_written_out(keep, odd_pixels):
    table = keep.model.visual.positional_embedding.detach().double().numpy()
    grid = table[1:].reshape(14, 14, -1)
    want = np.einsum("ai,ijd,bj->abd", _keys_matrix(14, 10), grid, _keys_matrix(14, 16)).reshape(160, -1)
    got = _positions(keep, odd_pixels).numpy()
    np.testing.assert_allclose(got[0], table[0], atol=1e-6)  # class token's position unchanged
    np.testing.assert_allclose(got[1:], want, atol=1e-6)  # float32 tower vs float64 formula
    assert np.abs(got[1:] - grid.reshape(196, -1)[:160]).max() > 1e-2  # not the first rows of the table


def test_hf_equals_transformers_interpolate_pos_encoding(hf_pair, altclip_keep, odd_pixels):
    _, hf = hf_pair
    px = torch.rand(2, 3, 96, 224, generator=torch.Generator().manual_seed(1))  # 3×7 patches of 32
    for model, x in ((hf, px), (altclip_keep, odd_pixels)):
        vm = model.model.vision_model
        with torch.no_grad():
            ours, _ = model.vision.input_embedding(x)
            theirs = vm.embeddings(hf_normalised(model, x), interpolate_pos_encoding=True)
            native = model.model.visual_projection(vm(pixel_values=hf_normalised(model, x),
                                                      interpolate_pos_encoding=True).pooler_output)
            emb = model.vision(x)[0]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        torch.testing.assert_close(emb, native, rtol=1e-5, atol=1e-5)
        assert model.grid_for(x) == (x.shape[2] // model.patch_size, x.shape[3] // model.patch_size)


def test_open_clip_equals_resize_pos_embed_without_antialias(keep, odd_pixels):
    """open_clip built natively at 160×256 with the positions resized by its own ``resize_pos_embed``:
    antialias=False is the reference's interpolation (same embedding); its default antialias=True
    (PIL-like kernel, a = −0.5) is not."""
    cfg = open_clip.get_model_config("tiny")
    vision = dict(cfg["vision_cfg"], image_size=[H, W])
    native = open_clip.CLIP(cfg["embed_dim"], vision, cfg["text_cfg"], quick_gelu=True).eval()
    with torch.no_grad():
        ours = keep.vision(odd_pixels)[0]
        normalised = keep.vision.normalise(odd_pixels)
        diffs = {}
        for antialias in (False, True):
            sd = {k: v.clone() for k, v in keep.model.state_dict().items()}
            open_clip.model.resize_pos_embed(sd, native, antialias=antialias)
            native.load_state_dict(sd)
            diffs[antialias] = (native.encode_image(normalised) - ours).abs().max().item()
    assert diffs[False] < 1e-5 and diffs[True] > 1e-3, diffs


def test_every_image_explainer_at_a_non_square_size(keep, odd_pixels):
    tokens = keep.tokenize(["a dog on the grass"])
    for name in EXPLAINERS:
        explainer = build(compose_cfg(["model=tiny", f"explainer={name}", "explainer.modality=image",
                                       *CHEAP.get(name, [])]), "explainer")
        raw = explainer(keep, odd_pixels, tokens, torch.tensor([7]))
        assert tuple(raw.shape[-2:]) in ((10, 16), (H, W)), name
        maps = image_maps(raw, (H, W))
        assert maps.shape == (1, H, W) and torch.isfinite(maps).all(), name


@pytest.mark.parametrize("name", ["eclip", "gradcam", "maskclip", "selfattn"])  # Grad-ECLIP's keep-size methods
def test_hf_backends_give_maps_on_the_input_grid(hf_pair, altclip_keep, odd_pixels, name):
    explainer = build(compose_cfg(["model=altclip_tiny", f"explainer={name}"]), "explainer")
    for model, grid in ((hf_pair[1], (5, 8)), (altclip_keep, (10, 16))):
        raw = explainer(model, odd_pixels, model.tokenize(["a dog"]), torch.tensor([7]))
        assert raw.shape == (1, *grid) and torch.isfinite(raw).all() and image_maps(raw, (H, W)).shape == (1, H, W)


def test_patch_maps_follow_the_grid_row_major(keep, odd_pixels):
    """The self-attention map is the class token's attention row laid out row by row on 10×16."""
    tokens = keep.tokenize(["a dog"])
    got = SelfAttention()(keep, odd_pixels, tokens)
    with torch.no_grad():
        _, rec = keep.vision(odd_pixels, record=(11,), heads={11: 1})
    assert torch.equal(got[0], rec[11].probs[0, 0, 0, 1:].reshape(10, 16))
    assert torch.equal(keep.patch_map(rec[11].probs[:, 0, 0], odd_pixels), got)
    with input_size((H, W)):
        assert torch.equal(keep.patch_map(rec[11].probs[:, 0, 0]), got)


def test_wrong_sizes_and_settings_get_one_clear_error(tiny, keep, odd_pixels):
    with pytest.raises(ClipXaiError, match=r"multiple of the patch size 16, got 150×256"):
        keep.encode_image(torch.rand(1, 3, 150, 256))
    with pytest.raises(ClipXaiError, match="model.keep_size=true"):
        tiny.encode_image(odd_pixels)
    with pytest.raises(ClipXaiError, match="multiple of the patch size"):
        keep.grid_for((8, 224))
    with pytest.raises(ClipXaiError, match="pass the explained pixels"):
        keep.patch_map(torch.zeros(1, 161))  # 10×16 patches without their size
    with pytest.raises(ClipXaiError, match="model.keep_size='yes'"):
        OpenClipAdapter("tiny", "tiny", keep_size="yes")
    with pytest.raises(ClipXaiError, match="needs a ViT image tower"):
        OpaqueVision(torch.nn.Identity(), 224, (0.5,) * 3, (0.5,) * 3, "ModifiedResNet", keep_size=True)


def test_config_setting():
    for name in ("tiny", "vit_b16", "open_clip", "hf_clip", "altclip", "altclip_tiny"):
        assert compose_cfg([f"model={name}"]).model.keep_size is False
    model = build(compose_cfg(["model=tiny", "model.keep_size=true"]), "model")
    assert model.keep_size and model.grid_for((H, W)) == (10, 16)
    with pytest.raises(ClipXaiError, match="model.keep_size"):
        build(compose_cfg(["model=altclip_tiny", "model.keep_size=sometimes"]), "model")


def test_keep_size_preprocessing():
    # int(x/p + 0.5)·p: halves round up (Python's round would give 32 for 40 px)
    assert keep_size_shape(375, 500, 16) == (368, 496)
    assert keep_size_shape(40, 8, 16) == (48, 16)
    assert keep_size_shape(224, 224, 32) == (224, 224)
    with pytest.raises(ClipXaiError, match="smaller than half"):
        keep_size_shape(7, 100, 16)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8))
    capped = cap_short_side(img)
    assert capped.size == (int(1000 / (700 / 640)), 640) == (914, 640)
    assert np.array_equal(np.asarray(capped), np.asarray(img.resize((914, 640), Image.BICUBIC)))
    assert cap_short_side(capped) is capped and cap_short_side(img, None) is img
    px = keep_size_pixels(capped, 16)
    want = np.asarray(capped.resize((912, 640), Image.BICUBIC), dtype=np.float32) / 255
    assert px.shape == (3, 640, 912)
    np.testing.assert_array_equal(px.permute(1, 2, 0).numpy(), want)
