"""Plain data carried between datasets, models, explainers and studies."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TextTokens:
    """A tokenised caption batch, with the token positions every text method needs.

    ids: (B, L) token ids. attention_mask: (B, L) 1 for real tokens (0 = padding).
    pool_index: (B,) position whose final state becomes the text embedding (EOT for CLIP,
    position 0 for AltCLIP). content_mask: (B, L) True for caption tokens (start/end/pad excluded).
    texts: the caption strings the ids were made from (None for ids built or edited directly);
    methods that re-prompt the caption, as CLIP Surgery's reference does, need them.
    """

    ids: Tensor
    attention_mask: Tensor
    pool_index: Tensor
    content_mask: Tensor
    texts: tuple[str, ...] | None = None

    def to(self, device: torch.device | str) -> "TextTokens":
        tensors = (t.to(device) for t in (self.ids, self.attention_mask, self.pool_index, self.content_mask))
        return TextTokens(*tensors, texts=self.texts)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def trimmed(self) -> "TextTokens":
        """The same texts with trailing positions that no row attends to dropped.

        Exact for the text towers here: padding is behind a causal mask (CLIP) or masked out of
        attention (AltCLIP), so a shorter pad changes no embedding; it only saves work.
        """
        if not len(self):
            return self
        n = max(int(self.attention_mask.sum(1).max()), int(self.pool_index.max()) + 1)
        return TextTokens(self.ids[:, :n], self.attention_mask[:, :n], self.pool_index, self.content_mask[:, :n], self.texts)

    def index(self, idx) -> "TextTokens":
        texts = None
        if self.texts is not None:
            rows = torch.arange(len(self.texts))[idx].reshape(-1).tolist()
            texts = tuple(self.texts[i] for i in rows)
        return TextTokens(self.ids[idx], self.attention_mask[idx], self.pool_index[idx], self.content_mask[idx], texts)


@dataclass
class Batch:
    """B samples: [0,1] pixels (B,3,H,W) at the model's input size plus their captions."""

    sample_ids: list[str]
    pixels: Tensor
    captions: list[str]
    labels: Tensor  # (B,) long, -1 where the dataset has no class label
    object_masks: Tensor | None = None  # (B,H,W) bool where the dataset ships a segmentation
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def subset(self, keep: list[int]) -> "Batch":
        """The samples at positions ``keep``, in that order, every per-sample field subset together
        (``extras`` is batch-level and is carried over as is)."""
        index = torch.tensor(keep, dtype=torch.long)
        return Batch(
            [self.sample_ids[i] for i in keep], self.pixels[index], [self.captions[i] for i in keep],
            self.labels[index], None if self.object_masks is None else self.object_masks[index], self.extras,
        )
