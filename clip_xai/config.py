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
from omegaconf import DictConfig, OmegaConf, open_dict

from clip_xai.errors import ClipXaiError
from clip_xai.seeds import sample_seed  # noqa: F401  (re-exported: config.sample_seed keeps working)

log = logging.getLogger(__name__)

# Keys that describe a config entry but are not constructor arguments.
META_KEYS = {"model": ("image_size",), "dataset": ("name", "on_long_caption"), "perturbation": (), "metrics": ("name",),
             "study": (), "explainer": (), "logger": ()}


def register_resolvers() -> None:
    """``run_dirname``: Hydra's override_dirname, or ``defaults`` when nothing was overridden.
    ``open_clip_image_size``: the input size of an open_clip architecture (model=open_clip).
    ``open_clip_preprocess``: its preprocessing for a pretrained tag (``model.preprocess``)."""
    if not OmegaConf.has_resolver("run_dirname"):
        OmegaConf.register_new_resolver("run_dirname", run_dirname)
    if not OmegaConf.has_resolver("open_clip_image_size"):
        from clip_xai.models.openclip import config_image_size

        OmegaConf.register_new_resolver("open_clip_image_size", config_image_size)
    if not OmegaConf.has_resolver("open_clip_preprocess"):
        from clip_xai.models.openclip import open_clip_preprocess

        OmegaConf.register_new_resolver("open_clip_preprocess", open_clip_preprocess)


RUN_DIRNAME_BYTES = 200  # a file name may have 255 bytes on common file systems; room for Hydra's suffixes


def run_dirname(overrides: str) -> str:
    """A job's folder name: Hydra's override_dirname with ``/`` replaced, ``defaults`` when nothing was
    overridden; a name over RUN_DIRNAME_BYTES bytes (long class lists, many overrides) is cut and ends
    in a hash of the whole, so it stays unique, the same on every rerun (resume), and a legal name."""
    name = overrides.replace("/", "_") if overrides else "defaults"
    raw = name.encode()
    if len(raw) <= RUN_DIRNAME_BYTES:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:12]
    head = raw[: RUN_DIRNAME_BYTES - len(digest) - 2].decode(errors="ignore")
    return f"{head}--{digest}"


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
    for (``model``, this device) chose for ``method`` (:mod:`clip_xai.perf.precision_table`; strict fp32
    without a table); other values are checked and returned unchanged."""
    if precision == "auto":
        from clip_xai.perf.precision_table import DEFAULT_DIR, lookup

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
        from clip_xai.models.fp8 import check_fp8

        check_fp8(device)


@contextlib.contextmanager
def precision_scope(device: torch.device, precision: str):
    """Numerics for model forwards and backwards.

    fp32: strict float32 (TF32 tensor-core maths off for matmuls and cuDNN convs, although PyTorch
    allows it for convs by default). tf32: float32 tensors, matmuls/convs on TF32 tensor cores
    (10-bit mantissa inputs, float32 accumulation). bf16/fp16: autocast, float32 outside it.
    fp8: bf16 autocast, and the no-grad linears in float8 (:mod:`clip_xai.models.fp8`).
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
                from clip_xai.models.fp8 import Fp8Linears

                stack.enter_context(Fp8Linears(device.type))
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# Top-level settings: name -> (check, what a valid value is). Each check takes the composed value.
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


TOP_LEVEL = {
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**63, "an integer in [0, 2**63)"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_workers": (lambda v: v == "auto" or (_is_int(v) and v >= 0), "auto or an integer >= 0"),
    "save_examples": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "cache": (lambda v: isinstance(v, bool), "true or false"),
    "name": (lambda v: isinstance(v, str) and v.strip() != "" and "/" not in v, "a non-empty folder name without '/'"),
    "device": (lambda v: isinstance(v, str) and v != "", "auto, cpu, cuda or cuda:N"),
    "precision": (lambda v: isinstance(v, str), "a precision name (see conf/config.yaml)"),
}
LOGGER = {"name": ("wandb", "none"), "mode": ("offline", "online", "disabled")}


def _bad(setting: str, value, valid: str) -> ClipXaiError:
    return ClipXaiError(f"{setting}={value!r} is not valid", f"set {setting} to {valid}")


def _default_type_ok(default, value) -> bool:
    """A group setting's value against the type of its default in the option's yaml file: an int
    default wants an int, a float default a number, a bool default a bool, a list default a list.
    String and null defaults take anything here: their components check the allowed names."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return _is_int(value)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return True


def _check_group_types(cfg: DictConfig, group: str, conf_dir: str | Path) -> None:
    """Every key of ``cfg[group]`` whose default (in ``conf/<group>/<option>.yaml``) is a literal
    against that default's type. Keys the file sets by interpolation are left to their components."""
    node = cfg.get(group)
    option = node.get("name") if node is not None else None
    path = Path(conf_dir) / group / f"{option}.yaml"
    if group == "study" or not isinstance(option, str) or not path.is_file():
        return
    defaults = group_option(conf_dir, group, option)
    for key in defaults:
        if key == "defaults" or OmegaConf.is_interpolation(defaults, key) or key not in node:
            continue
        default, value = defaults[key], node[key]
        if OmegaConf.is_config(default) and not OmegaConf.is_list(default):
            continue
        default = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if not _default_type_ok(default, value):
            kind = type(default).__name__ if default is not None else "value"
            raise ClipXaiError(f"{group}.{key}={value!r} is not valid: {group}={option} wants a {kind} there "
                               f"(default {default!r})", f"set {group}.{key} to a {kind}")


def validate(cfg: DictConfig, conf_dir: str | Path) -> dict:
    """Check every top-level and group setting of a composed config before anything is built or
    written: types and ranges of the top-level settings, the logger's choices, each group setting
    against the type of its default, and settings that depend on the model (``metrics.k`` /
    ``metrics.text_k`` against the map size ``model.image_size``²), and ``method_settings``
    (:func:`check_method_settings`). Component constructors then check their own ranges and names
    (each raises a :class:`ClipXaiError` through :func:`build`). Returns the checked
    ``method_settings`` as plain data: hand it to :func:`apply_method_settings` so it is not checked twice."""
    checked = check_method_settings(cfg, conf_dir)
    for key, (ok, valid) in TOP_LEVEL.items():
        if key in cfg and not ok(cfg[key]):
            raise _bad(key, cfg[key], valid)
    logger = cfg.get("logger") or {}
    for key, allowed in LOGGER.items():
        if key in logger and logger[key] not in allowed:
            raise _bad(f"logger.{key}", logger[key], " or ".join(allowed))
    if "log_images" in logger and not (_is_int(logger.log_images) and logger.log_images >= 0):
        raise _bad("logger.log_images", logger.log_images, "an integer >= 0")
    for group in ("model", "dataset", "explainer", "perturbation", "metrics", "logger"):
        _check_group_types(cfg, group, conf_dir)
    limit = OmegaConf.select(cfg, "dataset.limit", default=None)
    if limit is not None and not (_is_int(limit) and limit >= 1):
        raise _bad("dataset.limit", limit, "null (every sample) or an integer >= 1")
    size = OmegaConf.select(cfg, "model.image_size", default=None)
    if not (_is_int(size) and size >= 1):
        raise _bad("model.image_size", size, "an integer >= 1 (the model's input side in pixels)")
    for key in ("k", "text_k"):
        k = OmegaConf.select(cfg, f"metrics.{key}", default=None)
        if k is None:
            continue
        if not (_is_int(k) and k >= 1):
            raise _bad(f"metrics.{key}", k, "an integer >= 1")
        if key == "k" and k > size * size:
            raise ClipXaiError(f"metrics.k={k} is larger than the map ({size}x{size} = {size * size} pixels at "
                               f"model.image_size={size})", f"set metrics.k to at most {size * size}")
    return checked


# Per-method settings: ``method_settings: {rise: {n_masks: 200}}`` (``+method_settings.rise.n_masks=200``
# on the command line) applies to the jobs whose explainer is ``rise`` and to no other, so a sweep over
# methods can carry a setting that only some of them have. Keys are explainer options (file names in
# conf/explainer/); each key below one must be a setting of that option's yaml.
METHOD_SETTINGS = "method_settings"
_NOT_SETTINGS = ("_target_", "name")  # what a method is, not how it is set up
METHOD_SETTINGS_FIX = "e.g. +method_settings.rise.n_masks=200 on the command line (see docs/experiments.md)"


def explainer_options(conf_dir: str | Path) -> list[str]:
    """The ``explainer=`` options: the file names in ``conf/explainer/``."""
    return sorted(p.stem for p in (Path(conf_dir) / "explainer").glob("*.yaml"))


def explainer_settings(conf_dir: str | Path, name: str) -> DictConfig:
    """The settings of explainer option ``name`` as its yaml file gives them (same-group defaults merged),
    without the keys that say what the method is (``_target_``, ``name``)."""
    node = group_option(conf_dir, "explainer", name)
    for key in _NOT_SETTINGS:
        node.pop(key, None)
    return node


def methods_having(conf_dir: str | Path, key: str, names: list[str]) -> list[str]:
    """The explainer options among ``names`` whose yaml has setting ``key``: the rule both
    ``method_settings`` and the bench's ``--set explainer.KEY=VALUE`` follow (a per-method setting
    goes to the methods that have it)."""
    return [n for n in names if key in explainer_settings(conf_dir, n)]


def check_method_settings(cfg: DictConfig, conf_dir: str | Path) -> dict:
    """``cfg.method_settings`` checked as every other setting: a mapping from explainer options to
    mappings of their settings, each value of the type of that option's default. Every entry is
    checked, also those for methods this job does not run, so a typo stops the first job of a sweep.
    Returns the mapping as plain data."""
    node = cfg.get(METHOD_SETTINGS)
    if node is None:
        return {}
    if not OmegaConf.is_dict(node):
        raise ClipXaiError(f"{METHOD_SETTINGS}={OmegaConf.to_container(node) if OmegaConf.is_config(node) else node!r} "
                           "is not a mapping from methods to their settings", METHOD_SETTINGS_FIX)
    known = explainer_options(conf_dir)
    for method in node:
        if method not in known:
            raise ClipXaiError(f"{METHOD_SETTINGS}.{method}: there is no explainer {method!r} "
                               f"(explainers: {', '.join(known)})",
                               f"key {METHOD_SETTINGS} by an explainer= option (a file name in conf/explainer/)")
        settings = node[method]
        if settings is None:
            continue
        if not OmegaConf.is_dict(settings):
            raise ClipXaiError(f"{METHOD_SETTINGS}.{method}={settings!r} is not a mapping of settings",
                               f"give settings by name: +{METHOD_SETTINGS}.{method}.KEY=VALUE")
        defaults = explainer_settings(conf_dir, method)
        for key in settings:
            if key not in defaults:
                raise ClipXaiError(f"{METHOD_SETTINGS}.{method}.{key}: explainer={method} has no setting {key!r} "
                                   f"(its settings: {', '.join(defaults)})",
                                   f"use one of its settings, or drop {METHOD_SETTINGS}.{method}.{key}")
            if OmegaConf.is_interpolation(defaults, key):
                continue  # set by interpolation in the yaml: left to the component, as in _check_group_types
            default = defaults[key]
            if OmegaConf.is_dict(default):
                continue
            default = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
            value = settings[key]
            value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            if not _default_type_ok(default, value):
                kind = type(default).__name__ if default is not None else "value"
                raise ClipXaiError(f"{METHOD_SETTINGS}.{method}.{key}={value!r} is not valid: explainer={method} "
                                   f"wants a {kind} there (default {default!r})",
                                   f"set {METHOD_SETTINGS}.{method}.{key} to a {kind}")
    return OmegaConf.to_container(node, resolve=True)


def apply_method_settings(cfg: DictConfig, conf_dir: str | Path, checked: dict | None = None) -> dict:
    """Check ``cfg.method_settings`` and merge the entry of this job's explainer (``cfg.explainer.name``)
    into ``cfg.explainer``, in place, before anything is built: the merged values win over the yaml,
    the experiment file and ``explainer.KEY=`` overrides, and config.yaml records them as the
    explainer's settings. Returns the settings applied (empty when none is for this explainer).
    ``checked``: what :func:`validate` returned for this cfg; the check (which reads every explainer
    yaml) is skipped only while it still equals ``cfg.method_settings``."""
    node = cfg.get(METHOD_SETTINGS)
    current = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if checked is None or checked != (current if current is not None else {}):
        check_method_settings(cfg, conf_dir)
    name = OmegaConf.select(cfg, "explainer.name", default=None)
    own = OmegaConf.select(cfg, f"{METHOD_SETTINGS}.{name}", default=None) if name is not None else None
    if not own:
        return {}
    raw = OmegaConf.to_container(own, resolve=False)  # interpolations (``${seed}``) stay interpolations
    with open_dict(cfg.explainer):
        for key, value in raw.items():
            cfg.explainer[key] = value
    applied = OmegaConf.to_container(own, resolve=True)
    log.info("%s.%s applied to explainer=%s: %s", METHOD_SETTINGS, name, name, applied)
    return applied
