"""Config → objects: Hydra instantiation with metadata keys stripped, resolvers, device choice."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clip_xai.errors import ClipXaiError

log = logging.getLogger(__name__)

# Keys that describe a config entry but are not constructor arguments.
META_KEYS = {"model": ("image_size",), "dataset": ("name", "on_long_caption"), "perturbation": (), "metrics": ("name",),
             "study": (), "explainer": (), "logger": ()}


def register_resolvers() -> None:
    """``run_dirname``: Hydra's override_dirname, or ``defaults`` when nothing was overridden.
    ``open_clip_image_size``: the input size of an open_clip architecture (model=open_clip)."""
    if not OmegaConf.has_resolver("run_dirname"):
        OmegaConf.register_new_resolver("run_dirname", lambda s: s.replace("/", "_") if s else "defaults")
    if not OmegaConf.has_resolver("open_clip_image_size"):
        from clip_xai.models.openclip import config_image_size

        OmegaConf.register_new_resolver("open_clip_image_size", config_image_size)


def group_option(conf_dir: str | Path, group: str, name: str) -> DictConfig:
    """``conf/<group>/<name>.yaml`` with its same-group ``defaults`` merged in, as Hydra composes it
    (e.g. ``explainer/surgery_demo.yaml`` extends ``surgery``), without composing a whole config."""
    node = OmegaConf.load(Path(conf_dir) / group / f"{name}.yaml")
    defaults = list(node.pop("defaults", None) or [])
    if "_self_" not in defaults:
        defaults.append("_self_")
    parts = [node if d == "_self_" else group_option(conf_dir, group, str(d)) for d in defaults]
    return OmegaConf.merge(*parts)


def build(cfg: DictConfig, group: str, **kwargs):
    """Instantiate ``cfg[group]`` (its ``_target_``) without the group's metadata keys."""
    node = OmegaConf.to_container(cfg[group], resolve=True)
    missing = [k for k, v in node.items() if v == "???"]
    if missing:
        raise ClipXaiError(f"{group}.{missing[0]} is required for {group}={node.get('name', '?')}",
                           f"pass {group}.{missing[0]}=... on the command line")
    for key in META_KEYS.get(group, ()):
        node.pop(key, None)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ClipXaiError):
            raise cause from None  # the component's own clear message, not Hydra's wrapper
        target = node.get("_target_", "?")
        raise ClipXaiError(f"cannot build {group} ({target}): {cause or err}",
                           f"check the {group}.* settings against conf/{group}/") from err


def pick_device(spec: str, job_num: int | None = None) -> torch.device:
    """auto → CUDA if present (job ``n`` of a local parallel sweep gets GPU n mod count), else CPU."""
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        index = (job_num or 0) % count if count > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ else 0
        return torch.device(f"cuda:{index}")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ClipXaiError(f"device={spec} was asked for but CUDA is not available here", "use device=cpu or device=auto")
    try:
        return torch.device(spec)
    except RuntimeError as err:
        raise ClipXaiError(f"device={spec!r} is not a device name", "use device=auto, cpu, cuda or cuda:N") from err


PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
# ``precision=reference``: what the reference code ran. On CUDA, OpenAI's ``clip.load`` converts the
# weights to fp16 and Grad-ECLIP's generate_emap casts the inputs with ``.half()``; here that is fp16
# autocast (the same fp16-rounded weights and matmuls; layer norms and softmax in fp32, as OpenAI's
# fp32 LayerNorm, and a fp32 residual stream). fp16 is refused on a CPU, so it falls back to fp32.
REFERENCE_PRECISION = {"cuda": "fp16"}


def resolve_precision(device: torch.device, precision: str, announce: bool = False, method: str | None = None,
                      model: str | None = None, table_dir: str | Path | None = None) -> str:
    """The precision a run uses: ``reference`` becomes fp16 on CUDA and strict fp32 elsewhere (with a
    visible note when ``announce``); ``auto`` becomes the precision that the bench's agreement table
    for (``model``, this device) chose for ``method`` (:mod:`clip_xai.precision_table`; strict fp32
    without a table); other values are checked and returned unchanged."""
    if precision == "auto":
        from clip_xai.precision_table import DEFAULT_DIR, lookup

        if method is None or model is None:
            raise ClipXaiError("precision=auto needs the method and the model to look up",
                               "pass method= and model= to resolve_precision (the entrypoint does)")
        chosen, basis = lookup(table_dir or DEFAULT_DIR, model, device, method)
        check_precision(device, chosen)
        if announce:
            log.info("precision=auto -> %s for %s on %s (%s)", chosen, method, model, basis)
        return chosen
    if precision != "reference":
        check_precision(device, precision)
        return precision
    actual = REFERENCE_PRECISION.get(device.type, "fp32")
    if announce and actual == "fp32":
        log.warning("precision=reference: the reference code ran in fp16 on CUDA; fp16 is refused on %s, "
                    "so this run uses strict fp32 (maps may differ slightly from the reference's)", device.type)
    return actual


def check_precision(device: torch.device, precision: str) -> None:
    """One clear error for a precision that is unknown or that this device cannot run."""
    if precision in ("reference", "auto"):
        return  # always runnable: fp16 on CUDA, fp32 elsewhere; auto picks from a table of this device
    if precision not in PRECISIONS:
        raise ClipXaiError(f"precision={precision!r} is not known",
                           "use precision=fp32, tf32, bf16, fp16, fp8, reference or auto")
    if precision in ("fp16", "tf32") and device.type != "cuda":
        raise ClipXaiError(f"precision={precision} needs a CUDA device", "use precision=fp32 or bf16 on CPU")
    if precision == "fp8":
        from clip_xai.fp8 import check_fp8

        check_fp8(device)


@contextlib.contextmanager
def precision_scope(device: torch.device, precision: str):
    """Numerics for model forwards and backwards.

    fp32: strict float32 (TF32 tensor-core maths off for matmuls and cuDNN convs, although PyTorch
    allows it for convs by default). tf32: float32 tensors, matmuls/convs on TF32 tensor cores
    (10-bit mantissa inputs, float32 accumulation). bf16/fp16: autocast, float32 outside it.
    fp8: bf16 autocast, and the no-grad linears in float8 (:mod:`clip_xai.fp8`).
    reference: see :func:`resolve_precision`. ``auto`` must be resolved before (it needs the method).
    """
    if precision == "auto":
        raise ClipXaiError("precision=auto must be resolved per method before the work starts",
                           "call resolve_precision(device, 'auto', method=..., model=...) first")
    precision = resolve_precision(device, precision)
    dtype = PRECISIONS[precision]
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast(device.type, dtype=dtype, enabled=dtype is not None))
            if precision == "fp8":
                from clip_xai.fp8 import Fp8Linears

                stack.enter_context(Fp8Linears(device.type))
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample seed from the global seed and the sample id (stable across batchings)."""
    return int(hashlib.sha1(f"{seed}:{sample_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
