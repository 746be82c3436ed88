"""Padding is not part of a caption: appending padding tokens must not change any text map.

The references explain unpadded ids (M2IB ``tokenizer.encode``, NIB/ABM ``processor(text=[c])``);
both backends here pad to a fixed context (77). Each text-capable explainer is run on the same
captions padded to 77 and cut down to a few positions past the longest caption (every real token
kept: open_clip's causal mask and AltCLIP's key-padding mask make the dropped positions invisible
to the real ones), and the post-processed maps must agree on the kept positions.
"""
from __future__ import annotations

import pytest
import torch

from clip_xai.explainers.abm import ABM
from clip_xai.explainers.chefer import Chefer
from clip_xai.explainers.eclip import GradECLIP
from clip_xai.explainers.fastig import FastIG
from clip_xai.explainers.game import GAME
from clip_xai.explainers.interactions import SecondOrderInteractions
from clip_xai.explainers.attnlrp import AttnLRP
from clip_xai.explainers.m2ib import M2IB
from clip_xai.explainers.mfaba import MFABA
from clip_xai.explainers.rise import RISE
from clip_xai.explainers.rollout import Rollout
from clip_xai.explainers.saliency import Saliency
from clip_xai.explainers.selfattn import SelfAttention
from clip_xai.types import TextTokens
from tests.helpers import varies

EXTRA = 2  # padding positions kept after the longest caption's last real token

TEXT_EXPLAINERS = {
    # M2IB: with 2 steps, Adam's first updates move every token's λ by the same ±lr, so on the tiny
    # open_clip model the map is constant up to rounding (relative spread 1e-7); 4 steps give 1e-2.
    "m2ib": lambda: M2IB(modality="text", steps=4, copies=2),
    "abm": lambda: ABM(modality="text", steps=2, noise_samples=2),
    "mfaba": lambda: MFABA(modality="text", variant="attention", steps=2),
    "saliency": lambda: Saliency(modality="text"),
    "fastig_attention": lambda: FastIG(modality="text", variant="attention"),
    "chefer": lambda: Chefer(modality="text"),
    "eclip_attended": lambda: GradECLIP(modality="text", ksim_keys="attended"),
    "game_full": lambda: GAME(modality="text", start_layer=0),
    "rollout_full": lambda: Rollout(modality="text", start_layer=0),
    "selfattn": lambda: SelfAttention(modality="text"),
    "rise": lambda: RISE(modality="text", n_masks_text=16),
    "interactions": lambda: SecondOrderInteractions(modality="text", steps=2),
    "attnlrp": lambda: AttnLRP(modality="text"),
}


def cut(tokens: TextTokens, length: int) -> TextTokens:
    """The same captions with only the first ``length`` positions (the padding tail dropped)."""
    return TextTokens(tokens.ids[:, :length], tokens.attention_mask[:, :length], tokens.pool_index,
                      tokens.content_mask[:, :length])


def test_every_text_explainer_is_covered():
    """The list above names every explainer class that has text maps (a new one must be added)."""
    from clip_xai.explainers.base import Explainer

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    import clip_xai.explainers.surgery  # noqa: F401  (image-only methods register their classes too)
    import clip_xai.explainers.gradcam  # noqa: F401
    import clip_xai.explainers.maskclip  # noqa: F401
    covered = {type(make()) for make in TEXT_EXPLAINERS.values()}
    text_capable = {c for c in subclasses(Explainer) if "text" in c.modalities and not c.__name__.startswith("_")}
    assert text_capable <= covered, text_capable - covered


@pytest.mark.parametrize("name", list(TEXT_EXPLAINERS))
def test_text_maps_do_not_depend_on_padding(any_model, batch_for, name):
    """Raw scores on the caption tokens agree to float rounding (a different sequence length
    changes summation order; the normalised map then follows, since it is a function of these)."""
    model = any_model
    pixels, tokens, seeds = batch_for(model, 4)  # sample 3: on the random tiny model, Grad-ECLIP's
    pixels, tokens, seeds = pixels[3:], tokens.index(slice(3, 4)), seeds[3:]  # text maps of 0-2 are all zero
    length = int(tokens.attention_mask.sum(1).max()) + EXTRA
    assert length < tokens.ids.shape[1]  # the cut really drops padding
    short = cut(tokens, length)
    explainer = TEXT_EXPLAINERS[name]()
    content = short.content_mask
    full = explainer(model, pixels, tokens, seeds)[:, :length][content]
    part = explainer(model, pixels, short, seeds)[content]
    scale = full.abs().max()
    assert torch.isfinite(full).all() and varies(full), "a constant text map cannot show padding invariance"
    assert torch.allclose(full, part, rtol=1e-4, atol=1e-6 * float(scale)), (full, part)
