"""Fork server for the entrypoint tests: ``python -m clip_xai`` without paying its imports every time.

Started once per test process by :func:`tests.helpers.run_cli` (``python -m tests.entry_server``), it
imports the entrypoint and the heavy libraries (torch, open_clip, transformers, pandas, ...; 15-30 s
on the 2-core test machine) and runs no torch operation, so no thread pool exists yet. For each
request (one JSON line on stdin: module, args, env, cwd and two output files) it forks; the child sets
the environment, working directory and ``sys.argv``, points fd 0/1/2 at /dev/null and the two files,
and runs the module (``clip_xai``, ``clip_xai.data``, ...) as ``__main__`` with :mod:`runpy`, exactly
what ``python -m <module>`` does after its imports. Each run is its own process: Hydra's global state, logging, the open_clip model-config
registry, torch's RNG and any ``sys.exit`` stay in the child, and the exit status is the child's.
Replies on the saved stdout: ``{"pid": N}`` when the child starts, ``{"rc": N}`` when it ends.
"""
from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import traceback

# The entrypoint and what a run imports later (models, studies, report, sinks, launchers). A module
# that fails to import here is imported again by the child, which then shows the real error.
PRELOAD = ("clip_xai.__main__", "torch", "torchvision", "open_clip", "transformers", "pandas", "pyarrow.parquet",
           "scipy.stats", "skimage.metrics", "wandb", "hydra._internal.utils", "hydra_plugins", "clip_xai.models",
           "clip_xai.explainers", "clip_xai.perturbations", "clip_xai.metrics", "clip_xai.studies", "clip_xai.sinks",
           "clip_xai.data")


def _child(req: dict) -> int:
    """Body of the forked child: one ``python -m clip_xai`` run; returns its exit status."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["out"]), (2, req["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    module = req.get("module", "clip_xai")
    sys.argv = [module, *req["args"]]  # runpy sets argv[0] to <module>/__main__.py, as `-m` does
    sys.modules.pop(f"{module}.__main__", None)  # clip_xai.__main__ is preloaded; `-m` runs it fresh as __main__
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - as the interpreter does: traceback on stderr, status 1
        traceback.print_exc()
        return 1


def serve() -> None:
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # nothing the imports print can reach the reply channel
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - see PRELOAD
            pass
    reply.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                reply.close()
                code = _child(req)
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:  # noqa: BLE001 - a closed stream: nothing left to flush
                        pass
                os._exit(code)
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve()
