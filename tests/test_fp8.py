"""The FP8 path on a CPU: refusal where FP8 is missing, the quantisation arithmetic by hand, the kernel
against its float32 emulation, and the routing of no-grad linears (the GPU run waits for a GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clip_xai.models import fp8
from clip_xai.config import check_precision, precision_scope, resolve_precision
from clip_xai.errors import ClipXaiError


def test_fp8_is_refused_on_cpu_and_pre_ada_gpus():
    with pytest.raises(ClipXaiError, match="FP8 tensor cores"):
        check_precision(torch.device("cpu"), "fp8")
    with pytest.raises(ClipXaiError, match="FP8"):
        resolve_precision(torch.device("cpu"), "fp8")
    with pytest.raises(ClipXaiError, match="FP8"):
        with precision_scope(torch.device("cpu"), "fp8"):
            pass
    cuda = torch.device("cuda")
    assert "8.0" in fp8.fp8_refusal(cuda, capability=(8, 0))  # A100: no FP8 tensor cores
    assert "7.5" in fp8.fp8_refusal(cuda, capability=(7, 5))
    assert fp8.fp8_refusal(cuda, capability=(8, 9)) is None and fp8.fp8_refusal(cuda, capability=(9, 0)) is None


def test_per_tensor_scale_and_e4m3_rounding_by_hand():
    x = torch.tensor([0.5, -1.0, 3.0, 0.1])
    q, scale = fp8.quantise(x)
    assert scale.item() == pytest.approx(3.0 / 448)  # amax / largest e4m3 value
    # x / scale = 74.67, -149.33, 448, 14.93; e4m3 steps are 8 in [64,128), 16 in [128,256), 1 in [8,16)
    assert q.float().tolist() == [72.0, -144.0, 448.0, 15.0]
    assert fp8.dequantise(q, scale).tolist() == pytest.approx([72 * 3 / 448, -144 * 3 / 448, 3.0, 15 * 3 / 448])
    zeros, s0 = fp8.quantise(torch.zeros(3))
    assert s0.item() > 0 and zeros.float().abs().sum().item() == 0  # no division by zero


def test_kernel_matches_its_float32_emulation():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(7, 64, generator=gen), torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    emulated = fp8.emulated_linear(x, w, b)
    kernel = fp8.fp8_linear(x, w, b).float()  # torch._scaled_mm runs on a CPU too (no FP8 speed there)
    # the same float8 operands: the kernel differs from the float32 emulation only by its accumulation
    # and bf16 output/bias rounding, bounded by 2^-7 of the summed absolute terms
    xq, wq = fp8.dequantise(*fp8.quantise(x)), fp8.dequantise(*fp8.quantise(w))
    terms = xq.abs() @ wq.abs().t() + b.abs()
    assert (kernel - emulated).abs().le(2**-7 * terms).all()
    assert (kernel - emulated).abs().max() < (emulated - F.linear(x, w, b)).abs().max()  # << the fp8 error
    # and the emulation is within the float8 error bound of the float32 product: each operand is off
    # by at most 2^-4 relative (3 mantissa bits), so a product term by at most ~2 * 2^-4
    exact = F.linear(x, w, b)
    bound = (x.abs() @ w.abs().t()) * (2 * 2**-4 + 2**-8)
    assert (emulated - exact).abs().le(bound).all()
    assert (emulated - exact).abs().max() > 1e-3  # it really is quantised


def test_weights_are_quantised_once_per_version():
    w = torch.randn(16, 16)
    first = fp8.quantised_weight(w)
    assert fp8.quantised_weight(w)[0] is first[0]
    w.mul_(2.0)  # an in-place change (randomisation) invalidates the cached copy
    again = fp8.quantised_weight(w)
    assert again[0] is not first[0] and again[1].item() == pytest.approx(2 * first[1].item())


def test_only_no_grad_linears_are_routed(tiny):
    calls = []

    def spy(x, weight, bias=None):
        calls.append(tuple(weight.shape))
        return fp8.fp8_linear(x, weight, bias).to(x.dtype)

    px = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    mode = fp8.Fp8Linears("cpu", kernel=spy)
    with torch.no_grad():
        ref = tiny.encode_image(px)
        with mode:
            out = tiny.encode_image(px)
    # 12 blocks x (q/k/v in-projection, out-projection, MLP in, MLP out)
    assert mode.routed == 48 == len(calls) and mode.fallbacks == 0
    assert F.cosine_similarity(ref, out).min() > 0.99  # an FP8 forward, not a different model
    with mode:  # autograd on: a gradient method's forward stays as it was
        tiny.encode_image(px.requires_grad_())
    assert mode.routed == 48
    odd = torch.nn.Linear(10, 6)
    with torch.no_grad(), mode:
        odd(torch.randn(3, 10))
    assert mode.fallbacks == 1 and mode.routed == 48  # the kernel needs multiples of 16
