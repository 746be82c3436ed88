# Two commands do all set-up: `make run` (the default experiment) and `make test`.
# Both create .venv and install exactly the committed lock into it on first use.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= vit_b16
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q
QUIET_PIP := sed '/^WARNING: Location/d'  # pip.conf's find-links noise here; pip's own status is kept (pipefail)
# One hashed lock per supported Python (Linux x86_64), written by `make lock`.
PYVER := $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
LOCK := requirements/lock-py$(PYVER).txt
# `make lock`: uv resolves (pinned, in a scratch venv); only releases uploaded before LOCK_DATE count,
# so the same pyproject gives the same lock. Refresh: make test-latest, then make lock LOCK_DATE=<now>.
LOCK_DATE ?= 2026-12-06T00:00:00Z
UV_VERSION := 0.13.9
LOCK_TOOLS := .lock-tools
LATEST_VENV := .latest-venv

.PHONY: install lock test-latest run test test-fast smoke bench gpu-check report docs clean

install: $(STAMP)

# Exactly the lock (every package pinned and hash-checked), then the project itself without deps.
$(STAMP): pyproject.toml $(wildcard $(LOCK))
	@test -f $(LOCK) || { echo "no lock for Python $(PYVER) ($(LOCK)); supported: $$(ls requirements/lock-py*.txt)"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	set -o pipefail; $(PIP) --require-hashes -r $(LOCK) 2>&1 | $(QUIET_PIP)
	set -o pipefail; $(PIP) --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import clip_xai, torch, torchvision, open_clip, hydra, wandb" && touch $(STAMP)

# Re-resolve pyproject.toml (deps + test and docs extras) into requirements/lock-py3.*.txt.
lock:
	test -x $(LOCK_TOOLS)/bin/uv || { $(PY) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/python -m pip install -q uv==$(UV_VERSION); }
	$(PY) requirements/lock.py --uv $(LOCK_TOOLS)/bin/uv --date $(LOCK_DATE)

# Drift check, the step before `make lock`: a throwaway venv with the newest releases the declared
# ranges allow; the adapter-equivalence tests and a tiny end-to-end run on them.
test-latest:
	rm -rf $(LATEST_VENV) && $(PY) -m venv $(LATEST_VENV)
	set -o pipefail; $(LATEST_VENV)/bin/python -m pip install -q --upgrade ".[test]" 2>&1 | $(QUIET_PIP)
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -iE "^(torch|torchvision|transformers|open.clip.torch|timm|numpy|pandas|pyarrow|hydra-core|wandb|scipy)==" | tee $(LATEST_VENV)/versions.txt
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(LATEST_VENV)/bin/python -m pytest tests -m adapter -p no:cacheprovider --timeout=900
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(LATEST_VENV)/bin/python -m clip_xai model=tiny dataset.limit=2 logger=none hydra.run.dir=$(LATEST_VENV)/run
	@echo "test-latest passed on: $$(tr '\n' ' ' < $(LATEST_VENV)/versions.txt)"

# The default experiment: ViT-B/16 (OpenAI weights) on the built-in sample images, a short
# eps sweep over the thesis methods, then the report. Offline: `make run MODEL=tiny`.
run: $(STAMP)
	$(BIN)/python -m clip_xai -m experiment=default model=$(MODEL)
	$(BIN)/python -m clip_xai.report outputs/default_$(MODEL)

# Every test, two pytest-xdist workers (one per core; a test module stays on one worker, so its module
# fixtures run once); the 40 slowest are listed at the end (docs/development.md, "Test times").
test: $(STAMP)
	$(BIN)/python -m pytest -x -p no:cacheprovider --timeout=600 -n 2 --dist loadscope --durations=40

# Everything except the slow end-to-end runs of the entrypoint.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -x -p no:cacheprovider -m "not slow"

# The quick bench by default (masks and steps reduced, rates scaled back and labelled; about 3 min
# on a 2-core CPU); `make bench FULL=1` runs the yaml defaults. e.g. BENCH_ARGS="--precision bf16"
bench: $(STAMP)
	$(BIN)/python -m clip_xai.perf.bench $(if $(FULL),--full) $(BENCH_ARGS)

# The prepared GPU check (about 8 min on one H100): CUDA tests, bench per precision with the map
# agreement, RISE compiled vs eager, PGD/map-attack/ViT-L rows, a short thesis sweep with its
# projection; report + CSVs in outputs/gpu-check/. Without a GPU it stops (exit 2);
# `make gpu-check DRY=1` runs every step on the tiny model on the CPU. Then
# `python -m clip_xai.perf.tables` writes the tables into docs/performance.md.
gpu-check: $(STAMP)
	$(BIN)/python -m clip_xai.perf.gpu_check $(if $(DRY),--dry)

report: $(STAMP)
	$(BIN)/python -m clip_xai.report outputs/default_$(MODEL)

# CPU smoke runs of every method through the real entrypoint on the tiny model:
# the 9 thesis methods x 4 eps (sensitivity), the 5 ABM-paper methods, and the methods of 2024-25
# papers (LeGrad, GEM, AttnLRP, second-order interactions with 2 path points) in both studies, and
# Grad-ECLIP's deletion/insertion curves (eclip at the image's own size, game at 224) on 12 class names, and
# the positive/negative perturbation curves (both directions) with a three-class zero-shot head.
smoke: $(STAMP)
	$(BIN)/python -m clip_xai -m name=smoke_thesis model=tiny dataset.limit=2 logger=none \
	  explainer=gradcam,game,eclip,selfattn,rollout,surgery,rise,m2ib,maskclip \
	  perturbation.eps=0.0157,0.0314,0.0627,0.1255
	$(BIN)/python -m clip_xai -m name=smoke_abm model=tiny dataset.limit=2 logger=none \
	  explainer=abm,saliency,fastig,mfaba,chefer study=sensitivity,faithfulness
	$(BIN)/python -m clip_xai -m name=smoke_2025 model=tiny dataset.limit=2 logger=none \
	  explainer=legrad,gem,attnlrp study=sensitivity,faithfulness
	$(BIN)/python -m clip_xai -m name=smoke_interactions model=tiny dataset.limit=2 logger=none \
	  explainer=interactions explainer.steps=2 study=sensitivity,faithfulness
	$(BIN)/python -m clip_xai -m name=smoke_deletion_insertion model=tiny model.keep_size=true dataset.limit=2 \
	  logger=none explainer=eclip,game study=deletion_insertion study.mode=deletion,insertion study.target=pred \
	  study.templates=simple 'study.classes=[cat,dog,bird,car,boat,plane,tree,house,person,flower,clock,cup]'
	$(BIN)/python -m clip_xai -m name=smoke_curves model=tiny dataset.limit=2 logger=none study=perturbation_curve \
	  'study.classes=[cat,dog,coffee]' study.target=pred study.against=pred \
	  explainer=gradcam,legrad study.direction=positive,negative

# The documentation site (mkdocs-material, API pages from the docstrings): broken links fail it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf outputs multirun .pytest_cache build dist site
