"""Test helpers: compose configs in-process and run the real entrypoint (forked from a ready server, or fresh)."""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from clip_xai.paths import CONF_DIR
from clip_xai.config import register_resolvers

REPO = Path(__file__).resolve().parents[1]


def compose_cfg(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def cli_env() -> dict:
    """The environment of an entrypoint run: the test's, W&B offline, one thread, offline hub."""
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str], timeout: int = 600, fresh: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m clip_xai`` with ``args`` (cwd: the repository, env: :func:`cli_env`); text output.

    By default the run is a child forked from :class:`EntryServer` (the entrypoint and its libraries
    already imported; the run itself is a process of its own, so its exit status, output, Hydra and
    logging state are those of the real command). ``fresh=True`` (or any extra ``subprocess.run``
    keyword) starts a new interpreter instead: for what only a fresh process shows (import-time
    behaviour, the real command line). Tests that only read a run's outputs share one run through a
    module fixture (see :func:`module_run`)."""
    return run_module("clip_xai", args, timeout, fresh, **kwargs)


def run_module(module: str, args: list[str], timeout: int = 600, fresh: bool = False,
               **kwargs) -> subprocess.CompletedProcess:
    """``python -m <module> args`` as :func:`run_cli` runs ``clip_xai`` (forked, or ``fresh``)."""
    if fresh or kwargs:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=cli_env(), text=True,
                              capture_output=True, timeout=timeout, **kwargs)
    return EntryServer.get().run(module, list(args), timeout)


class EntryServer:
    """One ``python -m tests.entry_server`` per test process (see that module): forks a ready
    entrypoint for each :func:`run_cli`. Restarted when the environment differs from the one it was
    started with (env vars read at import time, OMP_NUM_THREADS among them, must be the run's)."""

    _current: "EntryServer | None" = None
    _IGNORED = ("PYTEST_CURRENT_TEST",)  # changes for every test; read by nothing in clip_xai

    @classmethod
    def get(cls) -> "EntryServer":
        env = cli_env()
        key = {k: v for k, v in env.items() if k not in cls._IGNORED}
        if cls._current is None or cls._current.key != key or cls._current.proc.poll() is not None:
            if cls._current is not None:
                cls._current.close()
            cls._current = cls(env, key)
        return cls._current

    def __init__(self, env: dict, key: dict):
        self.key = key
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.entry_server"], cwd=REPO, env=env, bufsize=0,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # unbuffered: select sees every reply
        self.ready = False
        atexit.register(self.close)

    def _reply(self, timeout: float | None) -> dict:
        if timeout is not None and not select.select([self.proc.stdout], [], [], max(timeout, 0))[0]:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"tests.entry_server ended (status {self.proc.wait()}); run it by hand to see why")
        return json.loads(line)

    def run(self, module: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        if not self.ready:
            self._reply(None)  # its imports; not part of the run's timeout, as for a fresh process
            self.ready = True
        with tempfile.TemporaryDirectory(prefix="clip_xai_run_") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            env = {**cli_env(), "PYTEST_CURRENT_TEST": os.environ.get("PYTEST_CURRENT_TEST", "")}
            self.proc.stdin.write(json.dumps({"module": module, "args": args, "env": env, "cwd": str(REPO), "out": str(out),
                                              "err": str(err)}).encode() + b"\n")
            pid = self._reply(None)["pid"]
            deadline = time.monotonic() + timeout
            try:
                rc = self._reply(deadline - time.monotonic())["rc"]
            except BaseException as exc:  # timeout, pytest-timeout, Ctrl-C: end the run, keep the server usable
                os.kill(pid, signal.SIGKILL)
                self._reply(None)
                if isinstance(exc, TimeoutError):
                    raise subprocess.TimeoutExpired(["python", "-m", module, *args], timeout, _text(out),
                                                    _text(err)) from None
                raise
            return subprocess.CompletedProcess(["python", "-m", module, *args], rc, _text(out), _text(err))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _text(path: Path) -> str:
    """What a run wrote to ``path``; empty when it was killed before opening it."""
    return path.read_text(errors="replace") if path.exists() else ""


def module_run(*args: str, timeout: int = 600):
    """A module-scoped fixture that runs the entrypoint once (:func:`run_cli`) with ``args`` and
    ``output_root=<a fresh tmp dir>``; it gives ``(result, output_root)``. The cheap way for several
    tests to inspect one run::

        xs = module_run("-m", "model=tiny", "explainer=gradcam,rise", "name=xs")

        def test_rows(xs):
            res, root = xs
            assert res.returncode == 0, res.stderr[-3000:]
    """

    @pytest.fixture(scope="module")
    def run(tmp_path_factory):
        root = tmp_path_factory.mktemp("run")
        return run_cli([*args, f"output_root={root}"], timeout=timeout), root

    return run


def varies(values, rtol: float = 1e-4) -> bool:
    """True when ``values`` are not constant beyond float32 rounding: their span (max − min)
    exceeds ``rtol`` times their largest magnitude. A map that is constant in exact arithmetic
    still carries rounding noise of about 1e-7 of its magnitude, which ``span > 0`` or
    ``std() > 0`` accept; ``rtol`` = 1e-4 sits three decades above that noise."""
    values = values.detach().double().flatten()
    scale = values.abs().max().item()
    return scale > 0 and (values.max() - values.min()).item() > rtol * scale


def hf_normalised(adapter, pixels):
    """[0,1] pixels as a transformers vision model takes them (the adapter's own mean/std)."""
    return (pixels - adapter.vision.mean) / adapter.vision.std


def native_hf_tower(adapter, kind: str, inputs):
    """(projected embedding, last block's attention probabilities) from transformers' own forward of an
    HF-backed adapter (CLIPModel or AltCLIPModel: the same vision/text/projection attributes)."""
    m = adapter.model
    if kind == "vision":
        out = m.vision_model(pixel_values=hf_normalised(adapter, inputs), output_attentions=True)
        return m.visual_projection(out.pooler_output), out.attentions[-1]
    out = m.text_model(input_ids=inputs.ids, attention_mask=inputs.attention_mask, output_attentions=True)
    return m.text_projection(out.pooler_output), out.attentions[-1]


def recorded_and_native_grads(adapter, kind: str, target: str, pixels, tokens, table, mask_padded_queries=False):
    """Gradients of one seeded random weighting of the embedding (``target="embedding"``) or of the
    last block's attention (``"probs"``), through the adapter's recorded path and through
    transformers' native forward: at the pixels (vision) or at the word-embedding ``table`` (text).
    ``mask_padded_queries`` zeroes the text weights of padded query rows (masked differently by HF CLIP)."""
    import torch

    tower = adapter.vision if kind == "vision" else adapter.text
    grads = []
    for path in ("recorded", "native"):
        leaf = pixels.clone().requires_grad_(True) if kind == "vision" else table
        inp = leaf if kind == "vision" else tokens
        table.requires_grad_(kind == "text")  # the adapter freezes its weights
        try:
            if path == "recorded":
                emb, recs = tower(inp, record=(-1,))
                probs = recs[tower.n_layers - 1].probs
            else:
                emb, probs = native_hf_tower(adapter, kind, inp)
            out = emb if target == "embedding" else probs
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
            if mask_padded_queries and kind == "text" and target == "probs":
                weights = weights * tokens.attention_mask[:, None, :, None]
            (grad,) = torch.autograd.grad((out * weights).sum(), leaf)
        finally:
            table.requires_grad_(False)
        grads.append(grad)
    return grads
