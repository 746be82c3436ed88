"""clip_xai: sensitivity and faithfulness benchmark for saliency methods on CLIP-family models."""

__version__ = "0.1.0"
