"""Each model's own preprocessing: the project's [0,1] pixels, normalised by the tower, equal
open_clip's own eval transform (``open_clip.image_transform`` of the pretrained tag's config, which is
what ``create_model_and_transforms`` returns as ``preprocess``) to 1e-6, for three families with
different preprocessing. Only metadata of the tags is read: no weights are downloaded."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image

from clip_xai.data.base import ImageCaptionDataset, Record
from clip_xai.models.openclip import OpenClipAdapter, config_image_size, open_clip_preprocess
from clip_xai.models.preprocess import Preprocess
from tests.helpers import compose_cfg

FAMILIES = [
    ("ViT-B-16-quickgelu", "openai", "shortest", "bicubic"),  # OpenAI CLIP: shorter side, centre crop
    ("ViT-B-16-SigLIP", "webli", "squash", "bicubic"),  # SigLIP: squash, mean = std = 0.5
    ("ViT-L-14-CLIPA", "datacomp1b", "squash", "bilinear"),  # CLIPA: bilinear, ImageNet mean/std
]


def _images() -> list[Image.Image]:
    """A wide and a tall image with structure at every scale (noise on gradients)."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in [(213, 341), (390, 257)]:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], -1) * 180
        out.append(Image.fromarray((base + rng.integers(0, 75, (h, w, 3))).astype(np.uint8)))
    return out


def _reference(arch: str, cfg: dict):
    return open_clip.image_transform(config_image_size(arch), is_train=False, mean=tuple(cfg["mean"]),
                                     std=tuple(cfg["std"]), resize_mode=cfg["resize_mode"],
                                     interpolation=cfg["interpolation"], fill_color=cfg["fill_color"])


@pytest.mark.parametrize("arch,tag,mode,interp", FAMILIES)
def test_pixels_equal_open_clip_preprocess(arch, tag, mode, interp):
    cfg = open_clip_preprocess(arch, tag)
    pcfg = open_clip.pretrained.get_pretrained_cfg(arch, tag)
    assert (cfg["resize_mode"], cfg["interpolation"]) == (mode, interp)
    assert cfg["mean"] == pytest.approx(list(pcfg["mean"])) and cfg["std"] == pytest.approx(list(pcfg["std"]))
    size = config_image_size(arch)
    records = [Record(sample_id=str(i), image=img, caption="x") for i, img in enumerate(_images())]
    ds = ImageCaptionDataset(records, image_size=size, preprocess=cfg)
    ref = _reference(arch, cfg)
    for i, img in enumerate(_images()):
        ours = ds.preprocess.normalise(ds[i]["pixels"][None])[0]
        theirs = ref(img)
        assert ours.shape == theirs.shape == (3, size, size)
        assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("fill", [0, 128])
def test_longest_mode_pads_as_open_clip(fill):
    cfg = {"resize_mode": "longest", "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3,
           "fill_color": fill}
    p = Preprocess.from_config(64, cfg)
    ref = open_clip.image_transform(64, is_train=False, mean=(0.5,) * 3, std=(0.25,) * 3, resize_mode="longest",
                                    interpolation="bicubic", fill_color=fill)
    for img in _images():
        assert (p.normalise(p.pixels(img)[None])[0] - ref(img)).abs().max().item() <= 1e-6
    mask = p.mask(np.ones((213, 341), bool), (341, 213))
    assert mask[0].sum() == 0 and mask[32].all()  # padding is not object; the image's rows are


def test_masks_follow_the_image_geometry():
    p = Preprocess.from_config(32, {"resize_mode": "squash"})
    m = np.zeros((40, 80), bool)
    m[:, :40] = True  # left half
    out = p.mask(m, (80, 40))
    assert out.shape == (32, 32) and out[:, :16].all() and not out[:, 16:].any()


def test_the_tower_normalises_with_the_models_own_statistics():
    """A random tiny model given SigLIP's preprocessing normalises with mean = std = 0.5, and the
    run's config records the preprocessing of its model (what the dataset applied)."""
    m = OpenClipAdapter("tiny", "tiny", preprocess=open_clip_preprocess("ViT-B-16-SigLIP", "webli"))
    x = torch.rand(1, 3, m.image_size, m.image_size)
    assert torch.allclose(m.vision.normalise(x), (x - 0.5) / 0.5)
    default = OpenClipAdapter("tiny", "tiny")
    assert default.vision.mean.flatten().tolist() == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
    cfg = compose_cfg(["model=open_clip", "model.arch=ViT-B-16-SigLIP", "model.pretrained=webli"])
    resolved = yaml.safe_load(yaml.safe_dump(__import__("omegaconf").OmegaConf.to_container(cfg, resolve=True)))
    assert resolved["model"]["preprocess"]["resize_mode"] == "squash"
    assert resolved["dataset"]["preprocess"] == resolved["model"]["preprocess"]
