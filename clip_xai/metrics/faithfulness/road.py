"""ROAD (RemOve And Debias) with Noisy Linear Imputation, batched in torch.

Protocol (METHODS.md §3.4; Rong, Leemann et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022, arXiv:2202.00449; reference code tleemann/road_evaluation,
road/imputations.py ``NoisyLinearImputer`` and jacobgil/pytorch-grad-cam,
pytorch_grad_cam/metrics/road.py + perturbation_confidence.py, read for the definitions only):

* **Imputation.** Every removed pixel takes the weighted mean of its 8 neighbours, weight 1/6 for
  the 4 direct and 1/12 for the 4 diagonal neighbours; neighbours outside the image are dropped
  from the normaliser; kept pixels are fixed. For removed pixel ``i`` with in-image neighbour
  weight sum ``W_i`` this is the linear system ``W_i x_i − Σ_{j removed} w_ij x_j =
  Σ_{j kept} w_ij v_j`` (one system per image and channel; the matrix depends on the mask only).
  Then ``noise·N(0,1)`` (noise = 0.01, absolute) is added to the removed pixels only, as the
  reference does.
* **Masks.** From a (H,W) map with percentile ``p``: MoRF keeps pixels with
  ``map < percentile_p(map)``; LeRF does the same on ``1 − map``. Percentiles use linear
  interpolation between order statistics (numpy's default, as ``np.percentile`` in PGC).
* **Score.** ``s(imputed) − s(original)`` with ``s`` = cos(f_I(·), f_T(caption)) (the image target of
  the confidence protocol), averaged over ``p ∈ {10,…,90}`` for MoRF and for LeRF;
  ``road = (mean_LeRF − mean_MoRF)/2`` (PGC ``ROADCombined``; higher is better).

Solvers (ours; the reference calls ``scipy.sparse.linalg.spsolve`` once per image). The system
matrix is ``R(D − W)R`` restricted to the removed pixels ``R`` — a grounded weighted graph
Laplacian: symmetric, weakly diagonally dominant, positive definite as soon as every connected
removed region touches a kept pixel (always, unless *no* pixel is kept). The matrix depends on the
mask only, so the C channels share it.

* ``cg`` (default on CUDA; any device): matrix-free. ``W`` is a fixed 3×3 stencil, so applying the
  matrix to all (image, channel) systems at once is one ``conv2d`` on the device; Jacobi-
  preconditioned conjugate gradients run on every system in parallel (systems found converged at
  a restart are frozen) until each imputed pixel equals the weighted mean of its neighbours to
  within ``tol`` (max over pixels of ``|residual_i| / W_i``, in the units of the image, checked
  on the true residual). The start is a coarse-to-fine guess (the same imputation on a 2× coarser grid,
  recursively), which removes most of the smooth error that CG is slowest on. Arithmetic is
  float64: float32 cannot reliably resolve a 1e-6 residual on values of size ~2.
* ``direct`` (default on CPU): the sparse matrix is assembled with whole-image torch ops and
  factorised once per mask with SuperLU (``scipy.sparse.linalg.splu``, symmetric minimum-degree
  ordering), then solved for the C channels together: exact up to round-off. On CPU it is
  10-50× faster than the CG above. Measured on 224×224 masks from upsampled 7×7 maps (the 18
  MoRF/LeRF masks of each image), 2 shared cores: SuperLU ≈ 0.13 s per mask (B=8: ≈ 20 s, plus
  ≈ 10 s for the 144 ViT-B/32 forwards); CG 1–6 s per mask (worse in big batches, which wait for
  their slowest system), because CG needs several hundred sweeps when a hole spans most of the
  image. CG at tol 1e-6 is within 1e-4 (normalised units) of the exact solution on such masks.
  The scipy call is the one host-side step, and only on this CPU path.

``tests/test_road.py`` checks both against an independently assembled ``scipy.sparse`` matrix
solved with ``spsolve``.

Units: the reference imputes whatever tensor the model receives — CLIP-normalised pixels in PGC
(METHODS.md §3.4) — so the noise of 0.01 is in normalised units. Our adapters take [0,1] pixels and
normalise inside; :func:`road_scores` normalises, imputes and adds the noise there, and maps back
with ``x = mean + std·z``. The imputation itself is affine-equivariant per channel (weights sum to 1),
so only the noise scale depends on this choice: it equals 0.01·std_c ≈ 0.0027 in [0,1] units.
No [0,1] clamp is applied afterwards (PGC does not clamp either).

Edge case (a deviation): MoRF keeps ``map < percentile_p(map)``, so when more than p% of a map
shares its minimum value (ReLU'd maps such as Grad-CAM often are zero on most pixels; a constant
map always) *no* pixel is kept at that p. The system then has no boundary and is singular (the
reference's ``spsolve`` returns NaN or garbage); here the whole image is filled with 0 in normalised units (the
mean colour) plus the noise, i.e. the "remove everything" score.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

HIGHER_IS_BETTER = True

DEFAULT_PERCENTAGES = (10, 20, 30, 40, 50, 60, 70, 80, 90)

# 3×3 neighbour weights (centre 0): 1/6 direct, 1/12 diagonal. Sum = 1.
_W_DIRECT, _W_DIAG = 1.0 / 6.0, 1.0 / 12.0


def neighbour_kernel(dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """(1,1,3,3) stencil of the neighbour weights (symmetric, so conv == correlation)."""
    k = torch.tensor([[_W_DIAG, _W_DIRECT, _W_DIAG],
                      [_W_DIRECT, 0.0, _W_DIRECT],
                      [_W_DIAG, _W_DIRECT, _W_DIAG]], dtype=dtype, device=device)
    return k.view(1, 1, 3, 3)


def _nbr_sum(x: Tensor, kernel: Tensor) -> Tensor:
    """Σ_j w_ij x_j over in-image neighbours for (N,1,H,W) x (zero padding = neighbour absent)."""
    return F.conv2d(x, kernel, padding=1)


def _weight_sums(shape: tuple[int, int], kernel: Tensor) -> Tensor:
    """(1,1,H,W) normaliser W_i: total weight of the in-image neighbours of each pixel."""
    ones = torch.ones((1, 1, *shape), dtype=kernel.dtype, device=kernel.device)
    return _nbr_sum(ones, kernel)


def _pcg(b: Tensor, removed: Tensor, wsum: Tensor, kernel: Tensor, x: Tensor, tol: float,
         max_iter: int, check_every: int = 8) -> tuple[Tensor, int]:
    """Jacobi-preconditioned CG on every (N,1,H,W) system at once; returns (x, iterations).

    ``A x = removed ⊙ (wsum ⊙ x − nbr_sum(removed ⊙ x))``; the unknowns live on ``removed``
    (x is kept 0 elsewhere). Per-system scalars; systems converged at a restart are frozen.
    Convergence: max over removed pixels of |b − A x| / wsum ≤ tol, confirmed on the true residual.
    """
    def apply(v: Tensor) -> Tensor:
        return removed * (wsum * v - _nbr_sum(v, kernel))

    def true_err(v: Tensor) -> tuple[Tensor, Tensor]:
        r = b - apply(v)
        return r, (r.abs() / wsum).amax(dim=(1, 2, 3))

    x = x * removed
    r, err = true_err(x)
    active = err > tol
    it = 0
    while bool(active.any()) and it < max_iter:
        # (Re)start CG from the true residual: robust against drift of the recursive residual.
        z = r / wsum
        p = z
        rz = (r * z).sum(dim=(1, 2, 3))
        while it < max_iter:
            ap = apply(p)
            pap = (p * ap).sum(dim=(1, 2, 3))
            ok = active & (pap > 0)
            alpha = torch.where(ok, rz / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
            x = x + alpha.view(-1, 1, 1, 1) * p
            r = r - alpha.view(-1, 1, 1, 1) * ap
            it += 1
            if it % check_every == 0 and bool(((r.abs() / wsum).amax(dim=(1, 2, 3))[active] <= tol).all()):
                break
            z = r / wsum
            rz_new = (r * z).sum(dim=(1, 2, 3))
            beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
            p = z + beta.view(-1, 1, 1, 1) * p
            rz = rz_new
        r, err = true_err(x)
        active = err > tol
    return x, it


def _coarse_guess(values: Tensor, keep: Tensor, min_size: int = 8) -> Tensor:
    """Smooth initial guess for the removed pixels: the same imputation on a 2× coarser grid.

    Coarse kept pixels = 2×2 blocks with at least one kept pixel (value: mean of the kept ones);
    the coarse solution is upsampled (nearest) to the fine grid. Recursion stops at ``min_size``
    (or an odd size), where the guess is the mean of the kept pixels. Only the starting point of
    CG depends on this; the converged solution does not.
    """
    h, w = values.shape[-2:]
    if min(h, w) < 2 * min_size or h % 2 or w % 2:
        fill = (values * keep).sum(dim=(2, 3), keepdim=True) / keep.sum(dim=(2, 3), keepdim=True).clamp_min(1)
        return fill.expand_as(values)
    ksum = F.avg_pool2d(keep, 2) * 4
    vsum = F.avg_pool2d(values * keep, 2) * 4
    ckeep = (ksum > 0).to(values.dtype)
    cval = vsum / ksum.clamp_min(1)
    cx = _solve_cg(cval, ckeep, tol=1e-3, max_iter=200)
    return F.interpolate(cx, scale_factor=2, mode="nearest")


def _solve_cg(values: Tensor, keep: Tensor, tol: float, max_iter: int) -> Tensor:
    """Impute (N,1,H,W) float ``values`` where ``keep`` (N,1,H,W, 0/1 float) is 0; noise-free."""
    kernel = neighbour_kernel(values.dtype, values.device)
    wsum = _weight_sums(tuple(values.shape[-2:]), kernel)
    removed = 1.0 - keep
    b = removed * _nbr_sum(keep * values, kernel)
    x, it = _pcg(b, removed, wsum, kernel, _coarse_guess(values, keep), tol, max_iter)
    if it >= max_iter and values.shape[-1] > 64:
        log.warning("ROAD imputation: CG stopped at max_iter=%d before reaching tol=%g", max_iter, tol)
    none_kept = keep.sum(dim=(1, 2, 3)) == 0
    x = torch.where(none_kept.view(-1, 1, 1, 1), torch.zeros_like(x), x)
    return keep * values + removed * x


# (dy, dx, weight) of the 8 neighbours.
_OFFSETS = [(dy, dx, _W_DIRECT if dy == 0 or dx == 0 else _W_DIAG)
            for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _solve_direct(values: Tensor, keep: Tensor, permc_spec: str = "MMD_AT_PLUS_A") -> Tensor:
    """Impute (N,C,H,W) float64 CPU ``values`` where ``keep`` (N,H,W) bool is False; noise-free.

    Per mask: assemble the removed-pixel system with whole-image tensor ops (right-hand side =
    the stencil applied to the kept pixels; off-diagonals from shifted views of the variable-index
    image), factorise it once with SuperLU and solve the C channels together. The matrix is
    symmetric, so a symmetric minimum-degree ordering (``MMD_AT_PLUS_A``) is used.
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    n, c, h, w = values.shape
    kernel = neighbour_kernel(torch.float64)
    wsum = _weight_sums((h, w), kernel).reshape(-1)
    out = values.clone()
    kf = keep.to(torch.float64)
    # Σ_{j kept} w_ij v_j for every pixel, all masks and channels in one convolution.
    rhs_all = _nbr_sum((values * kf[:, None]).reshape(n * c, 1, h, w), kernel).reshape(n, c, h * w)
    for i in range(n):
        removed = ~keep[i]
        rem = removed.reshape(-1).nonzero().squeeze(1)
        m = rem.numel()
        if m == 0:
            continue
        flat_out = out[i].view(c, h * w)
        if m == h * w:  # nothing kept: no boundary, singular system (see module docstring)
            flat_out.zero_()
            continue
        vid = torch.full((h * w,), -1, dtype=torch.long)
        vid[rem] = torch.arange(m)
        vid = vid.view(h, w)
        rows, cols, vals = [torch.arange(m)], [torch.arange(m)], [wsum[rem]]
        for dy, dx, wt in _OFFSETS:
            src = vid[max(0, -dy): h - max(0, dy), max(0, -dx): w - max(0, dx)]
            dst = vid[max(0, dy): h - max(0, -dy), max(0, dx): w - max(0, -dx)]
            pair = (src >= 0) & (dst >= 0)
            rows.append(src[pair])
            cols.append(dst[pair])
            vals.append(torch.full((rows[-1].numel(),), -wt, dtype=torch.float64))
        a = csc_matrix((torch.cat(vals).numpy(), (torch.cat(rows).numpy(), torch.cat(cols).numpy())), shape=(m, m))
        rhs = rhs_all[i][:, rem].T.contiguous()
        lu = splu(a, permc_spec=permc_spec, options={"SymmetricMode": True})
        flat_out[:, rem] = torch.from_numpy(lu.solve(rhs.numpy())).T
    return out


SOLVERS = ("auto", "cg", "direct")


def impute(images: Tensor, keep: Tensor, noise: float = 0.01, noise_draws: Tensor | None = None,
           tol: float = 1e-6, max_iter: int = 5000, solver: str = "auto") -> Tensor:
    """Noisy Linear Imputation of (N,C,H,W) ``images`` where ``keep`` (N,H,W) is False.

    ``noise_draws``: optional (N,C,H,W) standard-normal draws (seeded by the caller); when None
    and ``noise > 0`` the global torch RNG is used. ``solver``: ``cg``, ``direct`` or ``auto``
    (``cg`` on CUDA, ``direct`` elsewhere). Returns the input dtype on the input device.
    """
    if images.dim() != 4 or keep.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"expected (N,C,H,W) images and (N,H,W) keep masks, got "
                         f"{tuple(images.shape)} and {tuple(keep.shape)}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown ROAD solver {solver!r}; use one of {SOLVERS}")
    if solver == "auto":
        solver = "cg" if images.device.type == "cuda" else "direct"
    keep = keep.bool()
    n, c, h, w = images.shape
    # The study runs under autocast for precision=bf16/fp16, which would run conv2d in half
    # precision: the solve must stay float64.
    with torch.autocast(images.device.type, enabled=False), torch.no_grad():
        if solver == "cg":
            vals = images.detach().to(torch.float64).reshape(n * c, 1, h, w)
            k = keep.to(torch.float64)[:, None].expand(n, c, h, w).reshape(n * c, 1, h, w)
            out = _solve_cg(vals, k, tol, max_iter).reshape(n, c, h, w)
        else:
            out = _solve_direct(images.detach().to("cpu", torch.float64), keep.cpu()).to(images.device)
    if noise:
        eps = torch.randn_like(out) if noise_draws is None else noise_draws.to(out)
        out = out + noise * (~keep).to(out.dtype)[:, None] * eps
    return out.to(images.dtype)


def percentile_linear(values: Tensor, percentages: Sequence[float]) -> Tensor:
    """(B,...) → (P,B) per-sample percentiles, linear interpolation (numpy's default)."""
    q = torch.tensor([p / 100.0 for p in percentages], dtype=values.dtype, device=values.device)
    return torch.quantile(values.flatten(1), q, dim=1, interpolation="linear")


def road_keep_masks(maps: Tensor, percentages: Sequence[float] = DEFAULT_PERCENTAGES) -> tuple[Tensor, Tensor]:
    """MoRF and LeRF keep masks, each (B,P,H,W) bool, from (B,H,W) maps in [0,1].

    MoRF(p): keep ``map < percentile_p(map)``; LeRF(p): keep ``1−map < percentile_p(1−map)``.
    """
    out = []
    for m in (maps, 1.0 - maps):
        thr = percentile_linear(m, percentages).T  # (B,P)
        out.append(m[:, None] < thr[:, :, None, None])
    return out[0], out[1]


def road_seed(seed: int) -> int:
    """The per-sample seed salted for ROAD noise (distinct from the explainers' stream)."""
    return (int(seed) * 1_000_003 + 0x524F4144) & 0x7FFFFFFF


def road_scores(
    model,
    pixels: Tensor,
    maps: Tensor,
    text_emb: Tensor,
    s_orig: Tensor,
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    noise: float = 0.01,
    seeds: Tensor | Sequence[int] | None = None,
    chunk: int = 72,
    tol: float = 1e-6,
    solver: str = "auto",
) -> dict[str, Tensor]:
    """ROAD for B samples: ``road``, ``road_morf``, ``road_lerf`` (B,) float64, plus the curves.

    ``pixels`` (B,3,H,W) in [0,1]; ``maps`` (B,H,W) min-max normalised at input resolution;
    ``text_emb`` (B,E) unit text embeddings (the target); ``s_orig`` (B,) = cos(f_I(pixels), text).
    The imputation runs on CLIP-normalised pixels (see module docstring). Noise for sample b comes
    from a generator seeded with ``road_seed(seeds[b])``, so it does not depend on batching (and is
    not the stream an explainer drew from the same per-sample seed). ``chunk`` bounds
    how many imputed images are solved and encoded together. Also returns ``morf_curve`` and
    ``lerf_curve``: (B,P) score changes per percentage.
    """
    b, c, h, w = pixels.shape
    n_p = len(percentages)
    dev = pixels.device
    morf, lerf = road_keep_masks(maps.float(), percentages)
    keep = torch.cat([morf, lerf], dim=1).reshape(b * 2 * n_p, h, w)  # sample-major: (b, dir, p)
    mean, std = model.vision.mean.to(dev, torch.float32), model.vision.std.to(dev, torch.float32)
    z = (pixels.float() - mean) / std
    eps_all = None
    if noise:
        seeds = [0] * b if seeds is None else [int(s) for s in seeds]
        gens = [torch.Generator(device=dev).manual_seed(road_seed(s)) for s in seeds]
        eps_all = torch.stack([torch.randn((2 * n_p, c, h, w), generator=g, device=dev) for g in gens])
        eps_all = eps_all.reshape(b * 2 * n_p, c, h, w)
    idx = torch.arange(b, device=dev).repeat_interleave(2 * n_p)
    deltas = []
    for start in range(0, b * 2 * n_p, chunk):
        sl = slice(start, start + chunk)
        zi = impute(z[idx[sl]], keep[sl], noise=noise, noise_draws=None if eps_all is None else eps_all[sl],
                    tol=tol, solver=solver)
        # Kept pixels are copied from the input (no normalise/denormalise round-off).
        xi = torch.where(keep[sl][:, None], pixels[idx[sl]], (mean + std * zi).to(pixels.dtype))
        with torch.no_grad():
            s = (model.encode_image(xi).float() * text_emb[idx[sl]].float()).sum(-1)
        deltas.append(s - s_orig.float()[idx[sl]])
    d = torch.cat(deltas).double().reshape(b, 2, n_p)
    morf_curve, lerf_curve = d[:, 0], d[:, 1]
    road_morf, road_lerf = morf_curve.mean(1), lerf_curve.mean(1)
    return {"road": (road_lerf - road_morf) / 2, "road_morf": road_morf, "road_lerf": road_lerf,
            "morf_curve": morf_curve, "lerf_curve": lerf_curve}
