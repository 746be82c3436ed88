"""RISE text, ``text_scaling=token_table`` (rise_nib): the maps equal an independent rebuild of
NIB's ``RISET.forward`` (a model copy whose token-embedding rows are overwritten in place, position by
position, for the start token, the caption and the end token; repeated tokens share a row, so the
later position's mask wins), and ``embedded`` (rise) stays the default."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from clip_xai.explainers.rise import RISE


def _table(model):
    return None, {
        "OpenClipText": lambda t: t.src.token_embedding.weight,
        "AltClipText": lambda t: t.text_model.roberta.embeddings.word_embeddings.weight,
        "HfClipText": lambda t: t.text_model.embeddings.token_embedding.weight,
    }[type(model.text).__name__](model.text)


def nib_rebuild(model, explainer: RISE, tokens, pixels) -> torch.Tensor:
    """NIB's operation, written out: per mask, overwrite the table rows in place and re-encode."""
    out = torch.zeros(tokens.ids.shape, dtype=torch.float64)
    masks = explainer.text_masks(tokens.ids.device)
    with torch.no_grad():
        target = F.normalize(model.encode_image(pixels).float(), dim=-1)
        for i in range(len(tokens)):
            n = int(tokens.content_mask[i].sum())
            tid = tokens.ids[i, : n + 2].tolist()  # start, caption, end
            m = masks.for_length(n + 2)  # (N, n+2)
            twin = copy.deepcopy(model)
            _, table = _table(twin)
            original = table.detach().clone()
            one = tokens.index(torch.tensor([i]))
            for k in range(m.shape[0]):
                for p, t in enumerate(tid):  # position order: a repeated id keeps the later position's value
                    table[t] = original[t] * m[k, p]
                emb = F.normalize(twin.encode_text(one).float(), dim=-1)
                score = float((emb * target[i : i + 1]).sum())
                out[i, : n + 2] += score * m[k].double()
            out[i] /= m.shape[0] * explainer.p1_text
    return out * tokens.content_mask


@pytest.mark.parametrize("name", ["tiny", "altclip_tiny"])
def test_token_table_equals_nibs_riset(name, request):
    model = request.getfixturevalue(name)
    tokens = model.tokenize(["a dog and a cat and a dog", "red car"])
    n = int(tokens.content_mask[0].sum())
    assert len(set(tokens.ids[0, : n + 2].tolist())) < n + 2  # repeated tokens share a row
    pixels = torch.rand(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    explainer = RISE(modality="text", n_masks_text=12, s_text=4, p1_text=0.5, chunk=8, mask_seed=3,
                     text_scaling="token_table")
    ours = explainer(model, pixels, tokens).double()
    ref = nib_rebuild(model, explainer, tokens, pixels)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4), (ours - ref).abs().max()
    embedded = RISE(modality="text", n_masks_text=12, s_text=4, p1_text=0.5, chunk=8, mask_seed=3)
    assert embedded.text_scaling == "embedded"
    assert not torch.allclose(embedded(model, pixels, tokens).double(), ref, atol=1e-5)


def test_unknown_text_scaling_is_one_clear_error():
    from clip_xai.errors import ClipXaiError

    with pytest.raises(ClipXaiError, match="text_scaling"):
        RISE(modality="text", text_scaling="rows")
