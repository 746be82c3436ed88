"""Model adapters: every backend behind :class:`clip_xai.models.base.ClipAdapter`."""
from clip_xai.models.base import BlockRecord, ClipAdapter, Tower

__all__ = ["BlockRecord", "ClipAdapter", "Tower"]
