"""The masking check on explanation maps (FaithShield-style): does the map's top region matter to the model?

Babadi & Karimipour (the X-Shift authors; OpenReview submission "X-Shift attack and FaithShield
defense") flag manipulated explanations with a masking test on the top-k salient regions: an
explanation whose top-k region can be removed without the model noticing is flagged as unfaithful.
Their exact test was not available here; this module's form is a choice, documented here:

* the map (min-max normalised, image size) is averaged over the model's patch grid and its top
  ``top_share`` of patches are masked to the mean colour (normalised value 0, as the faithfulness
  study's confidence protocol blanks pixels);
* ``mask_drop`` = s(x) − s(x with the top patches masked), s the image–text cosine;
* the reference is the same number of patches drawn at random (seeded per sample, salted
  ``manipulation``; one draw shared by the clean and perturbed image): ``mask_drop_rand``;
* the map is **flagged** (``mask_flag`` = 1) when ``mask_drop − mask_drop_rand < threshold``
  (default 0): its top region matters to the model no more than random patches of the same area.
  A relative test, because an absolute drop has no common scale across models (on random weights
  s itself is near 0).

Columns come for the clean map on the clean image and (``_pert``) for the perturbed map on the
perturbed image, so the flag rate of X-Shifted maps can be set against clean and noise-perturbed ones.
``metrics=manipulation`` is the sensitivity suite plus these columns (the study's rows carry them
as NaN under ``metrics=sensitivity``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import SampleRng, cosine
from clip_xai.metrics.sensitivity import SensitivityMetrics
from clip_xai.models.base import ClipAdapter
from clip_xai.seeds import sample_seed

#: Columns this family adds to the sensitivity rows (NaN under metrics=sensitivity).
COLUMNS = ("mask_drop", "mask_drop_rand", "mask_flag", "mask_drop_pert", "mask_drop_rand_pert", "mask_flag_pert")
HIGHER_IS_BETTER = {"mask_drop": True, "mask_drop_pert": True, "mask_flag": False, "mask_flag_pert": False}


def patch_scores(maps: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B,H,W) maps → (B, h·w) mean map value per patch of the grid."""
    return F.adaptive_avg_pool2d(maps[:, None].float(), grid).flatten(1)


def top_patches(scores: Tensor, n: int) -> Tensor:
    """(B, h·w) bool: each row's ``n`` highest patches."""
    idx = scores.topk(n, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def random_patches(seeds: Tensor, count: int, n: int, device) -> Tensor:
    """(B, count) bool: ``n`` patches per sample drawn without replacement from its seed (salted)."""
    rng = SampleRng([sample_seed(int(s), "manipulation") for s in seeds], device)
    idx = torch.stack([torch.randperm(count, generator=g, device=rng.device)[:n] for g in rng.gens])
    return torch.zeros(len(seeds), count, dtype=torch.bool, device=device).scatter_(1, idx, True)


def mask_to_mean(model: ClipAdapter, pixels: Tensor, patches: Tensor) -> Tensor:
    """[0,1] pixels with the (B, h·w) chosen patches set to the model's mean colour."""
    region = patches.view(-1, 1, *model.grid).float()
    region = F.interpolate(region, size=tuple(pixels.shape[-2:]), mode="nearest")
    mean = model.vision.mean.to(pixels.dtype)
    return pixels * (1 - region) + mean * region


class ManipulationMetrics(SensitivityMetrics):
    """The sensitivity metrics plus the masking check (module docstring) for the clean and perturbed maps."""

    suite = "sensitivity"

    def __init__(self, k: int = 100, ssim_chunk: int = 64, top_share: float = 0.25, threshold: float = 0.0) -> None:
        super().__init__(k, ssim_chunk)
        if not 0.0 < float(top_share) < 1.0:
            raise ClipXaiError(f"metrics.top_share={top_share} is outside (0, 1)",
                               "use the share of patches masked, e.g. metrics.top_share=0.25")
        self.top_share = float(top_share)
        self.threshold = float(threshold)

    def __repr__(self) -> str:
        return f"ManipulationMetrics(k={self.k}, top_share={self.top_share}, threshold={self.threshold})"

    def model_columns(self, model: ClipAdapter, pixels: Tensor, pert_pixels: Tensor, text: Tensor, seeds: Tensor,
                      clean: Tensor, pert: Tensor, s_orig: Tensor, s_pert: Tensor) -> dict[str, Tensor]:
        """The masking-check columns (float64 (B,), NaN where a map is not finite) of min-max maps
        ``clean``/``pert`` (B,H,W) with ``text`` the unit text embeddings and s the unmasked cosines."""
        grid = model.grid
        count = grid[0] * grid[1]
        n = max(1, round(self.top_share * count))
        rand = random_patches(seeds, count, n, pixels.device)
        top_c, top_p = top_patches(patch_scores(clean, grid), n), top_patches(patch_scores(pert, grid), n)
        images = torch.cat([mask_to_mean(model, pixels, top_c), mask_to_mean(model, pixels, rand),
                            mask_to_mean(model, pert_pixels, top_p), mask_to_mean(model, pert_pixels, rand)])
        with torch.no_grad():
            s = cosine(model.vision(images)[0].float(), text.float().repeat(4, 1)).double()
        s_top_c, s_rand_c, s_top_p, s_rand_p = s.chunk(4)
        s_orig, s_pert = s_orig.double(), s_pert.double()
        out = {"mask_drop": s_orig - s_top_c, "mask_drop_rand": s_orig - s_rand_c,
               "mask_drop_pert": s_pert - s_top_p, "mask_drop_rand_pert": s_pert - s_rand_p}
        for suffix, m in (("", clean), ("_pert", pert)):
            bad = ~torch.isfinite(m.flatten(1)).all(1)
            flag = ((out[f"mask_drop{suffix}"] - out[f"mask_drop_rand{suffix}"]) < self.threshold).double()
            out[f"mask_flag{suffix}"] = flag
            for key in (f"mask_drop{suffix}", f"mask_drop_rand{suffix}", f"mask_flag{suffix}"):
                out[key] = out[key].masked_fill(bad.to(out[key].device), float("nan"))
        return out
