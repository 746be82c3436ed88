"""Plain re-implementations timed against clip_xai on the same inputs (``bench --baselines``).

These rows exist so that a speed regression shows. Each baseline does what a straightforward
implementation of the reference would do. None of them is the reference's code.

* **RISE**: RISE (Petsiuk et al., BMVC 2018) as the Grad-ECLIP repository's ``generate_emap.py``
  runs it. The masks are made on the CPU with NumPy and ``skimage.transform.resize`` (one resize
  per mask), the normalised image is multiplied by them, and the native open_clip
  ``encode_image`` scores 50 masked images per forward. It runs against
  :class:`clip_xai.explainers.rise.RISE` (``chunk: auto``) with the same number of masks, on
  ViT-B/16 with random weights.
* **Sensitivity metrics**: ``scipy.stats.spearmanr`` and
  ``skimage.metrics.structural_similarity`` (data range of the perturbed map), one pair at a
  time, against clip_xai's batched ``spearman`` and ``ssim`` on the same 224² pairs. The largest
  difference between the two results is reported too.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clip_xai.perf.timing import best_time

PLAIN_RISE_BATCH = 50


def plain_rise_masks(n: int, s: int, p1: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size) float32 masks: Bernoulli grid, bilinear resize (reflect), random crop."""
    from skimage.transform import resize

    cell = int(np.ceil(size / s))
    up = (s + 1) * cell
    grid = (rng.random((n, s, s)) < p1).astype(np.float32)
    masks = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        x, y = rng.integers(0, cell, 2)
        masks[i] = resize(grid[i], (up, up), order=1, mode="reflect", anti_aliasing=False)[x : x + size, y : y + size]
    return masks


def plain_rise(model, pixels: torch.Tensor, text: torch.Tensor, n_masks: int, s: int = 8, p1: float = 0.5,
               seed: int = 0) -> torch.Tensor:
    """(H, W) RISE map of one [0,1] image against a unit text embedding, the straightforward way."""
    size = pixels.shape[-1]
    masks = torch.from_numpy(plain_rise_masks(n_masks, s, p1, size, np.random.default_rng(seed))).to(pixels.device)
    normed = (pixels - model.vision.mean) / model.vision.std  # (1, 3, H, W)
    native = model.model  # the open_clip model itself, not the block-by-block re-run
    scores = []
    with torch.no_grad():
        for i in range(0, n_masks, PLAIN_RISE_BATCH):
            batch = masks[i : i + PLAIN_RISE_BATCH, None] * normed
            scores.append(F.normalize(native.encode_image(batch), dim=-1) @ text[0])
    return (torch.cat(scores) @ masks.view(n_masks, -1)).view(size, size) / (n_masks * p1)


def time_rise(device: torch.device, n_masks: int, repeats: int) -> dict:
    """Seconds per image: clip_xai RISE vs the plain 50-mask loop, ViT-B/16 with random weights."""
    from clip_xai.explainers.rise import RISE
    from clip_xai.models.openclip import OpenClipAdapter

    model = OpenClipAdapter("vit_b16", "ViT-B-16-quickgelu", pretrained=None).to(device)
    pixels = _sample_pixels(model, device)
    tokens = model.tokenize(["a photo of an astronaut"])
    text = model.encode_text(tokens)
    ours = RISE(n_masks=n_masks, compile=False)
    chunk = ours.chunk_size(model, device)
    t_ours = best_time(lambda: ours(model, pixels, tokens), device, repeats)
    t_plain = best_time(lambda: plain_rise(model, pixels, text, n_masks), device, repeats)
    return {"masks": n_masks, "chunk": chunk, "ours_s": t_ours, "plain_s": t_plain}


def _sample_pixels(model, device: torch.device) -> torch.Tensor:
    from clip_xai.data import SampleDataset, collate

    ds = SampleDataset(image_size=model.image_size)
    batch, _, _ = collate([ds[0]])
    return batch.pixels.to(device)


def time_metrics(device: torch.device, pairs: int, repeats: int) -> dict:
    """Seconds per 224² pair: clip_xai's batched Spearman + SSIM vs scipy + scikit-image per pair."""
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    from clip_xai.metrics.sensitivity import spearman, ssim

    gen = torch.Generator().manual_seed(0)
    clean = F.avg_pool2d(torch.rand(pairs, 1, 232, 232, generator=gen), 9, stride=1)[:, 0]  # smooth-ish maps
    pert = (clean + 0.05 * torch.rand(clean.shape, generator=gen)).clamp(0, 1)
    a, b = clean.to(device), pert.to(device)
    an, bn = clean.double().numpy(), pert.double().numpy()

    def plain():
        rho = [spearmanr(an[i].ravel(), bn[i].ravel()).statistic for i in range(pairs)]
        ss = [structural_similarity(an[i], bn[i], data_range=bn[i].max() - bn[i].min()) for i in range(pairs)]
        return np.array(rho), np.array(ss)

    def ours():
        rho, ss = spearman(a, b), ssim(a, b)
        return rho.cpu().numpy(), ss.cpu().numpy()

    (r_plain, s_plain), (r_ours, s_ours) = plain(), ours()
    t_ours, t_plain = best_time(ours, device, repeats), best_time(plain, device, repeats)
    return {"pairs": pairs, "ours_ms": 1e3 * t_ours / pairs, "plain_ms": 1e3 * t_plain / pairs,
            "max_diff": float(max(np.abs(r_plain - r_ours).max(), np.abs(s_plain - s_ours).max()))}


def run_baselines(device: torch.device, repeats: int, n_masks: int = 200, pairs: int = 64) -> str:
    """Both comparisons as a markdown section."""
    metrics = time_metrics(device, pairs, repeats)
    rise = time_rise(device, n_masks, repeats)
    return "\n".join([
        "## Against plain re-implementations (same inputs)", "",
        "| what | clip_xai | plain | plain / clip_xai |", "|---|---|---|---|",
        f"| RISE, ViT-B/16 (random weights), {rise['masks']} masks, 1 image (chunk {rise['chunk']} vs "
        f"{PLAIN_RISE_BATCH}-mask batches) | {rise['ours_s']:.2f} s | {rise['plain_s']:.2f} s | "
        f"{rise['plain_s'] / rise['ours_s']:.2f} |",
        f"| Spearman + SSIM per 224² pair ({metrics['pairs']} pairs; scipy + scikit-image; largest difference "
        f"{metrics['max_diff']:.1e}) | {metrics['ours_ms']:.2f} ms | {metrics['plain_ms']:.2f} ms | "
        f"{metrics['plain_ms'] / metrics['ours_ms']:.2f} |",
    ])
