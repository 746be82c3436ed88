"""The open_clip adapter: recomputed forward = native forward, attention capture, weight loading."""
from __future__ import annotations

import time

import pytest
import torch

from clip_xai.errors import ClipXaiError
from clip_xai.models.openclip import OpenClipAdapter


@pytest.mark.adapter
def test_recomputed_forward_matches_native(tiny, sample_images):
    pixels, captions = sample_images
    tokens = tiny.tokenize(list(captions))
    native_img = tiny.model.encode_image((pixels - tiny.vision.mean) / tiny.vision.std)
    native_txt = tiny.model.encode_text(tokens.ids)
    assert torch.allclose(tiny.vision(pixels)[0], native_img, atol=1e-5)
    assert torch.allclose(tiny.text(tokens)[0], native_txt, atol=1e-5)
    # Recording every block (explicit softmax path) gives the same embedding as the fused path.
    emb, recs = tiny.vision(pixels, record=range(tiny.vision.n_layers))
    assert torch.allclose(emb, native_img, atol=1e-5) and len(recs) == tiny.vision.n_layers


@pytest.mark.adapter
@pytest.mark.parametrize("tower_name", ["vision", "text"])
def test_recorded_probs_equal_manual_softmax(tiny, sample_images, tower_name):
    pixels, captions = sample_images
    tower = getattr(tiny, tower_name)
    inputs = pixels[:2] if tower_name == "vision" else tiny.tokenize(list(captions[:2]))
    layer = 5
    _, recs = tower(inputs, record=(layer,))
    rec = recs[layer]
    native = tower.blocks[layer].block  # open_clip ResidualAttentionBlock
    h = native.ln_1(rec.x_in)
    q, k, _ = torch.nn.functional.linear(h, native.attn.in_proj_weight, native.attn.in_proj_bias).chunk(3, -1)
    heads = native.attn.num_heads
    b, n, d = q.shape
    q = q.view(b, n, heads, d // heads).transpose(1, 2)
    k = k.view(b, n, heads, d // heads).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
    if tower_name == "text":
        scores = scores + torch.full((n, n), float("-inf")).triu(1)
    assert torch.allclose(rec.probs, scores.softmax(-1), atol=1e-6)
    assert torch.allclose(rec.probs.sum(-1), torch.ones(()), atol=1e-5)
    if tower_name == "text":
        assert rec.probs[..., torch.ones(n, n, dtype=torch.bool).triu(1)].abs().max() == 0


def test_single_head_override_changes_only_that_block(tiny, sample_images):
    pixels = sample_images[0][:1]
    _, recs = tiny.vision(pixels, record=(-1,), heads={-1: 1})
    assert recs[tiny.vision.n_layers - 1].probs.shape[1] == 1


def test_edit_before_block_is_applied(tiny, sample_images):
    pixels = sample_images[0][:2]
    base = tiny.vision(pixels)[0]
    same = tiny.vision(pixels, edits={9: lambda x: x})[0]
    changed = tiny.vision(pixels, edits={9: lambda x: x * 0.5})[0]
    assert torch.equal(base, same) and not torch.allclose(base, changed)


def test_tokens_positions(tiny):
    tok = tiny.tokenize(["a photo of a cat", "dog"])
    assert tok.pool_index.tolist() == [int(tok.ids[0].argmax()), int(tok.ids[1].argmax())]
    assert tok.content_mask[0, 0] == 0 and tok.content_mask[0, tok.pool_index[0]] == 0
    assert tok.content_mask.sum(1).tolist() == [5, 1]


def test_caption_too_long(tiny):
    with pytest.raises(ClipXaiError, match="too long"):
        tiny.tokenize(["word " * 100])


@pytest.mark.adapter
def test_checkpoint_roundtrip(tiny, tmp_path, sample_images):
    """Real loading code path (pretrained=<file>) with saved random weights, never a download."""
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    other = OpenClipAdapter("tiny", "tiny", pretrained=str(path), seed=123)
    pixels = sample_images[0][:2]
    assert torch.allclose(other.encode_image(pixels), tiny.encode_image(pixels), atol=1e-6)
    fresh = OpenClipAdapter("tiny", "tiny", seed=123)
    assert not torch.allclose(fresh.encode_image(pixels), tiny.encode_image(pixels))


def test_offline_pretrained_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setattr("clip_xai.models.weights.hub_reachable", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(ClipXaiError) as err:
        OpenClipAdapter("vit_b16", "ViT-B-16-quickgelu", pretrained="openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "ViT-B-16-quickgelu" in msg and "openai" in msg and "model=tiny" in msg


def test_unknown_architecture():
    with pytest.raises(ClipXaiError, match="unknown open_clip architecture"):
        OpenClipAdapter("x", "no-such-arch")
