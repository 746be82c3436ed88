"""Opt-in FP8 for the no-grad forwards (``precision=fp8``): float8 weights and activations through
``torch._scaled_mm``, no extra dependency.

What runs in FP8. Inside :func:`clip_xai.config.precision_scope` with ``precision=fp8`` everything
runs under bf16 autocast, and every ``F.linear`` called while autograd is off (``torch.no_grad``) on
a CUDA tensor goes through :func:`fp8_linear`: the q/k/v, output and MLP projections of RISE's
masked forwards (most of the thesis sweep's FLOPs) and of the studies' similarity forwards.
Gradient methods keep bf16 (their linears run with autograd on); convolutions (the patch
embedding), attention products, layer norms and softmax keep bf16/fp32.

Quantisation. Per-tensor scaling, as in NVIDIA Transformer Engine's and torchao's "tensorwise"
recipe: ``scale = amax(|x|) / 448`` (448 = the largest float8_e4m3fn value), ``q = (x / scale)``
cast to float8_e4m3fn (round to nearest even, 3 mantissa bits), ``x ≈ q · scale``. Activations are
scaled per call (dynamic), weights once per weight version (cached). ``torch._scaled_mm`` multiplies
the float8 operands with float32 accumulation and applies both scales and the bias in its epilogue,
writing bf16. :func:`emulated_linear` computes the same in float32 from the dequantised operands
(what the tests compare the kernel against).

Where. FP8 tensor cores exist from compute capability 8.9 (Ada, Hopper: H100/H200, L4, L40S). A
CPU or an older GPU is refused with one clear error (:func:`fp8_refusal`), never emulated
silently. Linears whose shapes the kernel does not take (inner or output size not a multiple of
16) stay in bf16 and are counted (:attr:`Fp8Linears.fallbacks`).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from clip_xai.errors import ClipXaiError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
MIN_CAPABILITY = (8, 9)
ALIGN = 16  # torch._scaled_mm: the inner and output sizes must be multiples of 16


def fp8_refusal(device: torch.device, capability: tuple[int, int] | None = None) -> str | None:
    """Why ``device`` cannot run ``precision=fp8`` (None when it can). ``capability`` defaults to
    what CUDA reports for the device."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"precision=fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+); this is {device.type}"
    if not hasattr(torch, "_scaled_mm"):
        return f"precision=fp8 needs torch._scaled_mm, which torch {torch.__version__} lacks"
    cap = tuple(capability) if capability is not None else torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (f"precision=fp8 needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ "
                f"(Ada, Hopper); this GPU has {cap[0]}.{cap[1]}")
    return None


def check_fp8(device: torch.device, capability: tuple[int, int] | None = None) -> None:
    """One clear error where ``device`` lacks FP8 (see :func:`fp8_refusal`)."""
    reason = fp8_refusal(device, capability)
    if reason is not None:
        raise ClipXaiError(reason, "use precision=bf16 (or auto) here; fp8 runs on H100/H200, L4 or L40S")


def tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor float32 scale ``amax(|x|) / 448`` (a zero tensor gets a tiny positive scale)."""
    amax = x.detach().abs().amax().float()
    return torch.clamp(amax, min=torch.finfo(torch.float32).tiny) / FP8_MAX


def quantise(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values, float32 scale) with ``x ≈ values.float() * scale``."""
    scale = tensor_scale(x) if scale is None else scale
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def emulated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``F.linear`` of the dequantised FP8 operands: what :func:`fp8_linear` computes before
    its final bf16 rounding."""
    xq = dequantise(*quantise(x))
    wq = dequantise(*quantise(weight))
    return F.linear(xq, wq, None if bias is None else bias.float())


_WEIGHTS: dict[int, tuple] = {}  # id(weight) -> (weakref, version, float8 values, scale)


def quantised_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's (float8, scale), computed once per weight version (in-place updates, such as
    the randomisation study's, invalidate it); dropped when the weight is freed."""
    key = id(weight)
    entry = _WEIGHTS.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        if entry is None or entry[0]() is not weight:
            weakref.finalize(weight, _WEIGHTS.pop, key, None)
        entry = (weakref.ref(weight), weight._version, *quantise(weight.detach()))
        _WEIGHTS[key] = entry
    return entry[2], entry[3]


def fits_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[0] % ALIGN == 0 and weight.shape[1] % ALIGN == 0 and x.shape[-1] == weight.shape[1]


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with float8 operands through ``torch._scaled_mm`` (per-tensor
    scales, float32 accumulation, ``out_dtype`` output). Shapes must satisfy :func:`fits_kernel`."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    qx, sx = quantise(x2)
    qw, sw = quantised_weight(weight)
    out = torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype,
                           bias=None if bias is None else bias.to(out_dtype))
    return out.reshape(*lead, weight.shape[0])


class Fp8Linears(TorchFunctionMode):
    """Routes no-grad ``F.linear`` calls on ``device_type`` tensors through ``kernel`` (default
    :func:`fp8_linear`); everything else runs unchanged. ``routed``/``fallbacks`` count the calls
    that went through the kernel and those whose shapes it does not take."""

    def __init__(self, device_type: str = "cuda", kernel=fp8_linear):
        super().__init__()
        self.device_type, self.kernel = device_type, kernel
        self.routed = self.fallbacks = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_grad_enabled():
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.device.type == self.device_type and x.is_floating_point():
                if fits_kernel(x, weight):
                    self.routed += 1
                    return self.kernel(x, weight, bias)
                self.fallbacks += 1
        return func(*args, **kwargs)
