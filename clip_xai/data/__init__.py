"""Datasets yielding CLIP-preprocessed [0,1] images with captions, labels and optional object masks.

Getting the real datasets: ``python -m clip_xai.data prepare|verify NAME`` (`prepare`, `verify`).
"""
from clip_xai.data.base import ImageCaptionDataset, PinnableBatch, Record, collate, make_loader, subset_indices
from clip_xai.data.conceptual_captions import ConceptualCaptionsDataset
from clip_xai.data.flickr8k import Flickr8kDataset
from clip_xai.data.imagenet import ImageNetDataset
from clip_xai.data.imagenet_seg import ImageNetSegDataset
from clip_xai.data.rival10 import RIVAL10_ATTRIBUTES, RIVAL10_CLASSES, RIVAL10_WNIDS, Rival10Dataset
from clip_xai.data.sample import SAMPLE_CAPTIONS, SampleDataset

__all__ = [
    "ImageCaptionDataset", "PinnableBatch", "Record", "collate", "make_loader", "subset_indices",
    "ConceptualCaptionsDataset", "Flickr8kDataset", "ImageNetDataset", "ImageNetSegDataset", "Rival10Dataset", "SampleDataset",
    "RIVAL10_ATTRIBUTES", "RIVAL10_CLASSES", "RIVAL10_WNIDS", "SAMPLE_CAPTIONS",
]
