"""Captions longer than the model's text context: skip (flagged row), truncate, or stop.

Real captions (Conceptual Captions alt-text, some Flickr8k sentences) can exceed CLIP's 77-token
context. The study checks every batch with `fit_captions` before tokenising, so one long caption
no longer stops a 2,000-sample run:

- ``skip`` (default): the sample gets a ``caption_too_long`` row (NaN metrics), counted in the
  summary like an unreadable image;
- ``truncate``: the caption is cut after its last whole word that fits (one character at a time
  if a single word is too long); the tokeniser then adds the end-of-text token as usual, so it
  stays the last token and pooling is unchanged. The row carries the text actually used in
  ``caption`` and ``caption_flag = "caption_truncated"``;
- ``error``: one clear error naming the sample.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clip_xai.errors import ClipXaiError
from clip_xai.types import Batch

LONG_CAPTION_POLICIES = ("skip", "truncate", "error")
TOO_LONG = "caption_too_long"        # map_flag of a skipped sample
TRUNCATED = "caption_truncated"      # caption_flag of a truncated one


def check_policy(policy: str) -> None:
    """Start-up check of ``dataset.on_long_caption``."""
    if policy not in LONG_CAPTION_POLICIES:
        raise ClipXaiError(f"dataset.on_long_caption must be one of {list(LONG_CAPTION_POLICIES)}, got {policy!r}",
                           "set `dataset.on_long_caption=skip` (flag and go on), `truncate` or `error`")


def _fits(model, text: str) -> bool:
    return model.token_lengths([text])[0] <= model.context_length


def _longest_fitting(model, pieces: list[str], join: str) -> int:
    """Largest k with ``join.join(pieces[:k])`` within the context (token counts grow with k)."""
    lo, hi = 0, len(pieces)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(model, join.join(pieces[:mid])):
            lo = mid
        else:
            hi = mid - 1
    return lo


def truncate_caption(model, caption: str) -> str:
    """The longest prefix of whole words (else characters) whose tokens fit ``model.context_length``."""
    words = caption.split()
    k = _longest_fitting(model, words, " ")
    if k:
        return " ".join(words[:k])
    return caption[: _longest_fitting(model, list(caption), "")]


@dataclass
class FittedBatch:
    """A batch with over-long captions removed (skip) or shortened (truncate)."""

    batch: Batch
    too_long: list[str]   # sample ids skipped
    truncated: set[str]   # sample ids whose caption was shortened


def fit_captions(model, batch: Batch, policy: str) -> FittedBatch:
    """Apply the long-caption policy to ``batch`` (a no-op when every caption fits)."""
    lengths = model.token_lengths(list(batch.captions))
    long = [i for i, n in enumerate(lengths) if n > model.context_length]
    if not long:
        return FittedBatch(batch, [], set())
    if policy == "error":
        i = long[0]
        raise ClipXaiError(
            f"caption of sample {batch.sample_ids[i]} has {lengths[i]} tokens, more than the model's "
            f"{model.context_length}: {batch.captions[i][:80]!r}",
            "set `dataset.on_long_caption=skip` (flagged row, run goes on) or `dataset.on_long_caption=truncate`",
        )
    if policy == "truncate":
        captions = list(batch.captions)
        for i in long:
            captions[i] = truncate_caption(model, captions[i])
        return FittedBatch(dataclasses.replace(batch, captions=captions), [], {batch.sample_ids[i] for i in long})
    kept = batch.subset([i for i in range(len(batch)) if i not in set(long)])
    return FittedBatch(kept, [batch.sample_ids[i] for i in long], set())
