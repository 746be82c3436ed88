"""AltCLIP backend: the block-by-block towers against the native transformers forward (small random model)."""
from __future__ import annotations

import time

import pytest
import torch
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.models import weights
from clip_xai.models.altclip import AltClipAdapter
from tests.helpers import hf_normalised, recorded_and_native_grads

CAPTIONS = ["a photo of a cat", "dog", "two birds on a wire, at dusk"]
TOL = 1e-5


@pytest.fixture(scope="module")
def adapter() -> AltClipAdapter:
    return AltClipAdapter("altclip-tiny", pretrained=False, seed=0)


@pytest.fixture(scope="module")
def pixels() -> Tensor:
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _features(out) -> Tensor:
    """get_*_features returns a tensor (transformers 4) or a ModelOutput with pooler_output (5.x)."""
    return out if isinstance(out, Tensor) else out.pooler_output




def _max_dev(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def test_config_and_attributes(adapter):
    cfg = adapter.model.config
    assert (adapter.image_size, adapter.patch_size, adapter.grid) == (224, 16, (14, 14))
    assert adapter.vision.n_layers == adapter.text.n_layers == 12
    assert adapter.vision.n_heads == adapter.text.n_heads == 2
    assert adapter.vision.width == adapter.text.width == 64 and cfg.projection_dim == 64
    assert cfg._attn_implementation == "eager"
    assert (adapter.pad_id, adapter.mask_token_id, adapter.bos_id, adapter.eos_id) == (1, 1, 0, 2)
    assert adapter.context_length == 77


@pytest.mark.adapter
def test_vision_matches_native(adapter, pixels):
    ours, _ = adapter.vision(pixels)
    native = _features(adapter.model.get_image_features(pixel_values=hf_normalised(adapter, pixels)))
    assert ours.shape == native.shape == (2, 64)
    assert _max_dev(ours, native) < TOL


@pytest.mark.adapter
def test_text_matches_native_on_padded_batch(adapter):
    tokens = adapter.tokenize(CAPTIONS)
    assert (tokens.attention_mask == 0).any()  # the batch really is padded
    ours, _ = adapter.text(tokens)
    native = _features(adapter.model.get_text_features(input_ids=tokens.ids, attention_mask=tokens.attention_mask))
    assert _max_dev(ours, native) < TOL
    # Each caption alone (no padding) gives the same embedding as inside the padded batch.
    for i, caption in enumerate(CAPTIONS):
        alone, _ = adapter.text(adapter.tokenize([caption]))
        assert _max_dev(alone[0], ours[i]) < TOL


@pytest.mark.adapter
def test_project_tokens_match_native_sequence(adapter):
    tokens = adapter.tokenize(CAPTIONS)
    x, bias = adapter.text.embed(tokens)
    x, _ = adapter.text.run(x, bias)
    seq = adapter.model.text_model(input_ids=tokens.ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert _max_dev(adapter.text.project_tokens(x), adapter.model.text_projection(seq)) < TOL
    pix = torch.rand(1, 3, 224, 224)
    xv, _ = adapter.vision.run(*adapter.vision.embed(pix))
    vm = adapter.model.vision_model
    hidden = vm(pixel_values=hf_normalised(adapter, pix)).last_hidden_state
    native = adapter.model.visual_projection(vm.post_layernorm(hidden))
    assert _max_dev(adapter.vision.project_tokens(xv), native) < TOL


@pytest.mark.adapter
def test_attention_probs_and_hidden_states_match_native(adapter, pixels):
    n = adapter.vision.n_layers
    _, recs = adapter.vision(pixels, record=range(n))
    out = adapter.model.vision_model(pixel_values=hf_normalised(adapter, pixels), output_attentions=True,
                                     output_hidden_states=True)
    assert len(out.attentions) == n
    for i in range(n):
        assert recs[i].probs.shape == out.attentions[i].shape == (2, 2, 197, 197)
        assert _max_dev(recs[i].probs, out.attentions[i]) < TOL
        assert _max_dev(recs[i].x_in, out.hidden_states[i]) < TOL
        assert _max_dev(recs[i].probs.sum(-1), torch.ones(())) < TOL

    tokens = adapter.tokenize(CAPTIONS)
    _, recs = adapter.text(tokens, record=range(n))
    out = adapter.model.text_model(input_ids=tokens.ids, attention_mask=tokens.attention_mask,
                                   output_attentions=True, output_hidden_states=True)
    pad_keys = (tokens.attention_mask == 0)[:, None, None, :]
    for i in range(n):
        probs = recs[i].probs
        assert _max_dev(probs, out.attentions[i]) < TOL
        assert _max_dev(recs[i].x_in, out.hidden_states[i]) < TOL
        assert _max_dev(recs[i].x_out, out.hidden_states[i + 1]) < TOL
        assert _max_dev(probs.sum(-1), torch.ones(())) < TOL
        assert probs.masked_select(pad_keys).abs().max().item() == 0.0  # padding gets no attention




# Gradients of the recorded path and of the native forward agree to a relative 1e-5 of the
# gradient's largest entry: both are float32 chains of the same operations (eps 1.2e-7) through
# 12 blocks, in a different association order; the measured deviation is 4e-7 to 7e-7 relative.
GRAD_RTOL = 1e-5


@pytest.mark.adapter
def test_recorded_and_fused_paths_agree_and_carry_gradients(adapter, pixels):
    """The split run (embed → run with a recorded block → pool) equals the fused call, and the
    recorded attention probabilities and the embedding carry the gradients of the native forward.

    Targets are random weightings of the embedding and of the last block's probabilities: neither
    is constant (a softmax row sums to 1, so the gradient of a row sum is zero in exact arithmetic
    and only rounding leaves ~1e-11 of it). The gradient is taken at the pixels (vision) and at the
    word-embedding table (text: token ids have no gradient), where both paths share the same leaf.
    """
    tokens = adapter.tokenize(CAPTIONS)
    table = adapter.model.text_model.roberta.embeddings.word_embeddings.weight
    for kind, tower, inputs in (("vision", adapter.vision, pixels), ("text", adapter.text, tokens)):
        fused, _ = tower(inputs)
        x, bias = tower.embed(inputs)
        y, recs = tower.run(x, bias, record=(-1,))
        assert _max_dev(fused, tower.pool(y, inputs)) < TOL
        assert set(recs) == {tower.n_layers - 1}

        for target in ("embedding", "probs"):
            recorded, native = recorded_and_native_grads(adapter, kind, target, pixels, tokens, table)
            scale = native.abs().max().item()
            assert scale > 1e-3, (kind, target, scale)  # a real gradient, far above rounding (~1e-11)
            assert _max_dev(recorded, native) <= GRAD_RTOL * scale, (kind, target)


@pytest.mark.adapter
def test_partial_runs_and_single_head_override(adapter, pixels):
    for tower, inputs in ((adapter.vision, pixels), (adapter.text, adapter.tokenize(CAPTIONS))):
        x, bias = tower.embed(inputs)
        full, _ = tower.run(x, bias)
        mid, _ = tower.run(x, bias, stop=9)
        rest, _ = tower.run(mid, bias, start=9)
        assert _max_dev(full, rest) < TOL
        _, recs = tower.run(x, bias, record=(-1,), heads={-1: 1})
        rec = recs[tower.n_layers - 1]
        assert rec.probs.shape[1] == 1 and rec.q.shape[-1] == tower.width


@pytest.mark.adapter
def test_pool_index_and_content_mask(adapter):
    tokens = adapter.tokenize(["ab", "abcd", ""])
    ids = tokens.ids
    # <s> ▁ a b </s> <pad>... / <s> ▁ a b c d </s> <pad>... / <s> </s> <pad>...  (fixed length 77)
    n = adapter.context_length
    assert ids.shape == (3, n)
    assert ids[:, 0].tolist() == [0, 0, 0]
    assert ids[0, 4].item() == 2 and ids[1, 6].item() == 2 and ids[2, 1].item() == 2
    assert ids[0, 5:].eq(1).all() and ids[2, 2:].eq(1).all()
    assert tokens.attention_mask.tolist() == [[1] * 5 + [0] * (n - 5), [1] * 7 + [0] * (n - 7), [1] * 2 + [0] * (n - 2)]
    assert tokens.pool_index.tolist() == [0, 0, 0]
    assert adapter.text.pool_index(tokens).tolist() == [0, 0, 0]
    assert tokens.content_mask[:, :7].tolist() == [
        [False, True, True, True, False, False, False],
        [False, True, True, True, True, True, False],
        [False] * 7,
    ]
    assert not tokens.content_mask[:, 7:].any()
    # Masking protocol: dropped tokens become pad + attention 0 and leave the content mask.
    edited = ids.clone()
    edited[1, 2] = adapter.mask_token_id
    mask = tokens.attention_mask.clone()
    mask[1, 2] = 0
    again = adapter.tokens_from_ids(edited, mask)
    assert again.content_mask[1, :7].tolist() == [False, True, False, True, True, True, False]
    assert again.pool_index.tolist() == [0, 0, 0]
    # Without an attention mask, pads are not attended.
    assert adapter.tokens_from_ids(ids).attention_mask.tolist() == tokens.attention_mask.tolist()
    # Edited embeddings still equal the native model given the same ids and mask.
    ours, _ = adapter.text(again)
    native = _features(adapter.model.get_text_features(input_ids=edited, attention_mask=mask))
    assert _max_dev(ours, native) < TOL


def test_vision_pool_index(adapter, pixels):
    assert adapter.vision.pool_index(pixels).tolist() == [0, 0]
    assert adapter.patch_map(torch.arange(197.0).expand(2, -1)).shape == (2, 14, 14)


def test_seeded_random_weights():
    a = AltClipAdapter("a", pretrained=False, seed=3, config_overrides={"vision": {"num_hidden_layers": 2},
                                                                       "text": {"num_hidden_layers": 2}})
    b = AltClipAdapter("b", pretrained=False, seed=3, config_overrides={"vision": {"num_hidden_layers": 2},
                                                                       "text": {"num_hidden_layers": 2}})
    c = AltClipAdapter("c", pretrained=False, seed=4, config_overrides={"vision": {"num_hidden_layers": 2},
                                                                       "text": {"num_hidden_layers": 2}})
    assert a.vision.n_layers == a.text.n_layers == 2
    wa, wb, wc = (m.model.vision_model.embeddings.patch_embedding.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.adapter
def test_save_pretrained_round_trip(adapter, pixels, tmp_path):
    adapter.save_pretrained(tmp_path / "full")
    reloaded = AltClipAdapter("reloaded", pretrained=str(tmp_path / "full"))
    tokens = adapter.tokenize(CAPTIONS)
    assert torch.equal(reloaded.tokenize(CAPTIONS).ids, tokens.ids)
    assert torch.equal(reloaded.encode_image(pixels), adapter.encode_image(pixels))
    assert torch.equal(reloaded.encode_text(tokens), adapter.encode_text(tokens))
    assert reloaded.model.config._attn_implementation == "eager"
    # model.save_pretrained alone (no tokenizer saved): the tiny vocabulary falls back to the test tokenizer.
    adapter.model.save_pretrained(tmp_path / "model_only")
    bare = AltClipAdapter("bare", pretrained=str(tmp_path / "model_only"))
    assert torch.equal(bare.tokenize(CAPTIONS).ids, tokens.ids)
    assert torch.equal(bare.encode_text(tokens), adapter.encode_text(tokens))


def test_offline_pretrained_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "hub_reachable", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(ClipXaiError) as err:
        AltClipAdapter("altclip", pretrained=True, cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    assert "BAAI/AltCLIP" in str(err.value) and "model=tiny" in str(err.value)


def test_missing_local_checkpoint(tmp_path):
    with pytest.raises(ClipXaiError, match="does not exist"):
        AltClipAdapter("altclip", pretrained=str(tmp_path / "nowhere"))


def test_too_long_caption_and_bad_image_size(adapter):
    with pytest.raises(ClipXaiError, match="too long") as err:
        adapter.tokenize(["short", "a" * 100])
    assert "fix:" in str(err.value)
    assert adapter.tokenize(["a" * 74]).ids.shape == (1, 77)  # <s> ▁ a×74 </s>: exactly the context
    with pytest.raises(ClipXaiError, match="too long"):
        adapter.tokenize(["a" * 75])
    with pytest.raises(ClipXaiError, match="224"):
        adapter.encode_image(torch.rand(1, 3, 112, 112))
