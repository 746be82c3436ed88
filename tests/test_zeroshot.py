"""The zero-shot head against a hand computation on the tiny random model, its cache keys and its errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from clip_xai.errors import ClipXaiError
from clip_xai.models.zeroshot import TEMPLATE_SETS, ZeroShotHead, check_logit_scale, imagenet_classnames

CLASSES = ["cat", "dog", "truck"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}", "{}"]


def hand_weights(model, classes, templates) -> np.ndarray:
    """Every prompt's embedding (one forward, template-major order), averaged per class and
    renormalised in float64 numpy."""
    prompts = [t.format(c) for t in templates for c in classes]
    with torch.no_grad():
        e = model.encode_text(model.tokenize(prompts)).double().numpy()
    e = e.reshape(len(templates), len(classes), -1)
    e /= np.linalg.norm(e, axis=2, keepdims=True)
    m = e.mean(0)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def head():
    return ZeroShotHead(CLASSES, TEMPLATES)


@pytest.fixture(scope="module")
def hand(tiny):
    return hand_weights(tiny, CLASSES, TEMPLATES)


def test_weights_equal_the_hand_computation(tiny, head, hand):
    w = head.weights(tiny)
    assert w.shape == hand.shape and w.dtype == torch.float32
    np.testing.assert_allclose(w.double().numpy(), hand, atol=2e-6)


def test_logits_and_predict_equal_the_hand_computation(tiny, head, hand, sample_images):
    pixels = sample_images[0][:2]
    with torch.no_grad():
        img = tiny.vision(pixels)[0].double().numpy()  # unnormalised on purpose: logits normalise it
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    expect = 100.0 * img @ hand.T
    got = head.image_logits(tiny, pixels)
    np.testing.assert_allclose(got.double().numpy(), expect, atol=1e-3)
    assert torch.equal(head.predict(tiny, pixels), got.argmax(1))
    own = ZeroShotHead(CLASSES, TEMPLATES, logit_scale="model").image_logits(tiny, pixels)
    np.testing.assert_allclose(own.double().numpy(), expect / 100.0 * tiny.logit_scale, rtol=1e-5, atol=1e-5)


def test_cache_is_reused_only_for_the_same_model_dtype_and_weights(tiny, head):
    w = head.weights(tiny)
    assert head.weights(tiny) is w  # cached
    other = copy.deepcopy(tiny)
    w_other = head.weights(other)
    assert w_other is not w and torch.allclose(w_other, w)  # another model object: its own entry
    with torch.no_grad():  # weights changed in place (as model randomisation does): rebuilt
        next(other.text.parameters()).mul_(1.5)
    w_changed = head.weights(other)
    assert w_changed is not w_other and not torch.allclose(w_changed, w_other)
    other.double()
    w_double = head.weights(other)
    assert w_double is not w_changed and w_double.dtype == torch.float32
    assert head.weights(tiny) is w  # the first model's entry is untouched
    # a different class or template list is a different head with different weights
    assert not torch.allclose(ZeroShotHead(CLASSES[::-1], TEMPLATES).weights(tiny), w)
    assert not torch.allclose(ZeroShotHead(CLASSES, TEMPLATES[:1]).weights(tiny), w)


def test_named_template_sets_and_imagenet_names():
    import open_clip.zero_shot_metadata as meta

    openai = TEMPLATE_SETS["openai"]
    assert len(openai) == 80 and all("{}" in t for t in openai)
    assert openai == tuple(t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES)
    assert TEMPLATE_SETS["simple"] == ("a photo of a {}",)
    assert set(TEMPLATE_SETS) == {"openai", "simple"}
    names = imagenet_classnames()
    assert len(names) == 1000 and names == list(meta.IMAGENET_CLASSNAMES)


@pytest.mark.parametrize("args, match", [
    ((["cat"],), "at least 2 classes"),
    (("cat",), "not a list"),
    ((CLASSES, ["a photo"]), "no {}"),
    ((CLASSES, "fancy"), "not known"),
    ((CLASSES, []), "empty"),
])
def test_bad_input_is_one_clear_error(args, match):
    with pytest.raises(ClipXaiError, match=match):
        ZeroShotHead(*args)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "100", "auto", None, [100], True])
def test_bad_logit_scale_is_one_clear_error(bad):
    with pytest.raises(ClipXaiError, match="logit_scale"):
        ZeroShotHead(CLASSES, logit_scale=bad)
    with pytest.raises(ClipXaiError, match="logit_scale"):
        check_logit_scale(bad)


@pytest.mark.parametrize("good", [100, 100.0, 1e-3, np.float32(50), torch.tensor(4.6), "model"])
def test_good_logit_scale_passes(good):
    check_logit_scale(good)
