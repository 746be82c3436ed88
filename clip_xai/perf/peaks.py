"""How far from the hardware limit: model FLOPs of a call, and the device's peak for a precision.

FLOPs are counted on the real call, backward included, with the formulas of
``torch.utils.flop_counter`` (those of ``FlopCounterMode``). They cover matrix products,
convolutions and attention; elementwise work is not counted, as is usual for model FLOPs. Two
differences from ``FlopCounterMode`` itself. First, its per-module tracker installs autograd
hooks that break ``torch.autograd.grad`` on leaf inputs (every gradient method here), so a plain
dispatch mode does the counting. Second, PyTorch has no formula for the CPU's fused attention
kernel (``_scaled_dot_product_flash_attention_for_cpu``), where attention would count as zero, so
the formulas of the CUDA kernels are registered for it.

Peaks: dense (no structured sparsity) tensor-core or FP32 throughput from the vendor
datasheets, per precision. ``fp32`` is strict float32 (no TF32), i.e. the non-tensor FP32 peak.
On a CPU there is no datasheet to trust, so :func:`cpu_matmul_peak` measures a large matmul once.
"""
from __future__ import annotations

import re

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from clip_xai.perf.timing import best_time

aten = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CUSTOM_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


class FlopCounter(TorchDispatchMode):
    """Sums the registered FLOP formulas of every aten op run inside it (no module tracking)."""

    registry = {**flop_registry, **{k: shape_wrapper(v) for k, v in CUSTOM_FORMULAS.items()}}

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in self.registry:
            with self:  # composite ops: count the products they decompose into
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in self.registry:
            self.total += int(self.registry[packet](*args, **kwargs, out_val=out))
        return out


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` (forward and any backward it runs), counted on the actual call."""
    with FlopCounter() as counter:
        fn()
    return counter.total


# Dense peak TFLOP/s per precision; the datasheets' tensor figures are "with sparsity", halved here.
# Sources (NVIDIA datasheets): H100 Tensor Core GPU (SXM5 / PCIe / NVL), H200 Tensor Core GPU (SXM /
# NVL), A100 Tensor Core GPU (SXM4 and PCIe, 40/80 GB: the same peaks), A10, L4, L40S, V100 (SXM2 /
# PCIe), T4. First matching pattern wins, so the specific variants come before the family name.
GPU_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    (r"H100.*PCIe", "H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0}),
    (r"H100.*NVL", "H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5}),
    (r"H100", "H100 SXM", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    (r"H200.*NVL", "H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5}),
    (r"H200", "H200 SXM", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    (r"A100", "A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (r"\bA10\b", "A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    (r"L40S", "L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0}),
    (r"\bL4\b", "L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.5}),
    (r"V100.*PCIe", "V100 PCIe", {"fp32": 14.0, "fp16": 112.0}),
    (r"V100", "V100 SXM2", {"fp32": 15.7, "fp16": 125.0}),
    (r"\bT4\b", "T4", {"fp32": 8.1, "fp16": 65.0}),
]


def gpu_peak(device_name: str, precision: str) -> tuple[str | None, float | None]:
    """(table entry, dense peak TFLOP/s) for a CUDA device name such as ``NVIDIA H100 80GB HBM3``;
    (None, None) for an unknown device, (entry, None) for a precision the device lacks."""
    for pattern, label, peaks in GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return label, peaks.get(precision)
    return None, None


def cpu_matmul_peak(precision: str = "fp32", n: int = 1024, repeats: int = 5) -> float:
    """Measured TFLOP/s of an n×n matmul on this CPU (best of ``repeats``, after a warm-up), in
    float32 or, for ``bf16``, bfloat16 (what autocast runs the matmuls in)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    best = best_time(lambda: a @ b, None, repeats, warmup=1)
    return 2 * n**3 / best / 1e12


def device_peak(device: torch.device, precision: str) -> tuple[str, float | None]:
    """(where the number comes from, peak TFLOP/s) for ``precision`` (already resolved) on ``device``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        label, peak = gpu_peak(name, precision)
        if label is None:
            return f"{name}: not in the peak table", None
        return f"{label} datasheet, dense {precision}", peak
    return f"measured {precision} matmul on this CPU", cpu_matmul_peak(precision)
