"""CUDA paths give the CPU's numbers (skipped without a GPU; CI has none, run these on one).

Deterministic explainers must give the CPU map on the GPU; the seeded ones (RISE, M2IB, ABM
draw their noise from CUDA generators, whose streams differ from the CPU's) must be
reproducible on the GPU. ROAD's CG solver on the GPU must agree with the CPU's direct solve,
and the real entrypoint must run on CUDA with loader workers, pinned memory and every precision.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clip_xai.config import build, precision_scope
from clip_xai.errors import ClipXaiError
from tests.helpers import compose_cfg, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPLAINERS = sorted(p.stem for p in (CONF / "explainer").glob("*.yaml"))
SEEDED = {"rise", "m2ib", "abm"}  # noise from per-device generators: reproducible, not CPU-equal
FAST = {"rise": ["explainer.n_masks=200", "explainer.n_masks_text=50"]}
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def models():
    """The same seeded tiny models on the CPU and on the GPU."""
    from clip_xai.models.altclip import AltClipAdapter
    from clip_xai.models.openclip import OpenClipAdapter

    return {
        "tiny": (OpenClipAdapter("tiny", "tiny", seed=0), OpenClipAdapter("tiny", "tiny", seed=0).to(CUDA)),
        "altclip_tiny": (AltClipAdapter("altclip_tiny", pretrained=False, seed=0),
                         AltClipAdapter("altclip_tiny", pretrained=False, seed=0).to(CUDA)),
    }


def _inputs(model, sample_images, n=2):
    pixels, captions = sample_images
    return pixels[:n].to(model.device), model.tokenize(list(captions[:n])), torch.arange(n) + 7


@pytest.mark.parametrize("name", ["tiny", "altclip_tiny"])
def test_recomputed_towers_match_cpu(models, sample_images, name):
    cpu, gpu = models[name]
    with precision_scope(CUDA, "fp32"):
        for model in (cpu, gpu):
            px, tok, _ = _inputs(model, sample_images, 4)
            model.out = (model.encode_image(px).cpu(), model.encode_text(tok).cpu(),
                         model.vision(px, record=range(model.vision.n_layers))[1][3].probs.cpu())
    for a, b in zip(cpu.out, gpu.out):
        assert torch.allclose(a, b, atol=2e-5), (a - b).abs().max()


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("name", EXPLAINERS)
def test_explainer_on_cuda(models, sample_images, name, modality):
    try:
        explainer = build(compose_cfg(["model=tiny", f"explainer={name}", f"explainer.modality={modality}",
                                       *FAST.get(name, [])]), "explainer")
    except ClipXaiError:
        pytest.skip(f"{name} has no {modality} maps")
    cpu, gpu = models["tiny"]
    with precision_scope(CUDA, "fp32"):
        got = explainer(gpu, *_inputs(gpu, sample_images))
        again = explainer(gpu, *_inputs(gpu, sample_images))
        want = explainer(cpu, *_inputs(cpu, sample_images))
    assert got.device.type == "cuda" and got.shape == want.shape and torch.isfinite(got).all()
    if name in SEEDED:
        assert torch.equal(got, again)
    else:
        scale = want.abs().amax(dim=tuple(range(1, want.ndim)), keepdim=True).clamp_min(1e-12)
        err = ((got.cpu() - want).abs() / scale).max().item()
        assert err < 1e-3, f"{name}/{modality}: CUDA map differs from CPU by {err:.2e} of its scale"


def test_precision_scope_sets_and_restores_tf32():
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    with precision_scope(CUDA, "tf32"):
        assert flags() == (True, True)
    with precision_scope(CUDA, "fp32"):
        assert flags() == (False, False)
    with precision_scope(CUDA, "bf16"):
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    assert flags() == before


def test_fp8_on_cuda_matches_its_emulation_and_keeps_the_embedding(models, sample_images):
    """precision=fp8 where the GPU has FP8 tensor cores (Ada/Hopper); refused elsewhere."""
    from clip_xai.models.fp8 import Fp8Linears, dequantise, emulated_linear, fp8_linear, fp8_refusal, quantise

    reason = fp8_refusal(CUDA)
    if reason is not None:
        with pytest.raises(ClipXaiError, match="fp8"):
            precision_scope(CUDA, "fp8").__enter__()
        pytest.skip(reason)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, w = torch.randn(64, 64, device=CUDA, generator=gen), torch.randn(128, 64, device=CUDA, generator=gen)
    kernel, emulated = fp8_linear(x, w).float(), emulated_linear(x, w)
    terms = dequantise(*quantise(x)).abs() @ dequantise(*quantise(w)).abs().t()
    assert (kernel - emulated).abs().le(2**-7 * terms).all()
    _, gpu = models["tiny"]
    px, _, _ = _inputs(gpu, sample_images, 4)
    mode = Fp8Linears("cuda")
    with torch.no_grad():
        ref = gpu.encode_image(px).float()
        with precision_scope(CUDA, "bf16"), mode:
            out = gpu.encode_image(px).float()
    assert mode.routed == 4 * gpu.vision.n_layers and mode.fallbacks == 0
    assert torch.nn.functional.cosine_similarity(ref, out).min() > 0.99


def test_road_cg_on_cuda_matches_direct_on_cpu():
    from clip_xai.metrics.faithfulness.road import impute

    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 3, 96, 96, generator=g)
    keep = torch.rand(3, 96, 96, generator=g) > torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1)
    cg = impute(img.to(CUDA), keep.to(CUDA), noise=0.0, solver="cg", tol=1e-8)
    direct = impute(img, keep, noise=0.0, solver="direct")
    assert cg.device.type == "cuda" and (cg.cpu() - direct).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["precision=fp32", "explainer=gradcam"],
    ["precision=tf32", "explainer=game"],
    ["precision=bf16", "explainer=m2ib"],
    ["precision=fp16", "explainer=eclip"],
    ["precision=fp32", "explainer=rollout", "study=faithfulness"],
], ids=lambda a: "-".join(x.split("=")[1] for x in a))
def test_entrypoint_on_cuda(tmp_path, args):
    proc = run_cli(["model=tiny", "dataset=sample", "logger=none", "device=cuda", "num_workers=2",
                    "batch_size=4", f"output_root={tmp_path}", "name=cuda", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary_file,) = tmp_path.glob("cuda/*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["run"]["device"].startswith("cuda") and summary["run"]["precision"] == args[0].split("=")[1]
    # the study's headline metrics are finite (columns that are NaN by design, e.g. `objective` under
    # FGSM or `matrix_spearman` for a method without a matrix, have NaN means and are not asserted)
    headline = ("conf_drop_image", "conf_incr_image") if "study=faithfulness" in args else ("spearman", "ssim", "topk", "sim_diff")
    assert all(summary["means"][k] == summary["means"][k] for k in headline), summary["means"]
