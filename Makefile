# Two commands do all set-up: `make run` (the default experiment) and `make test`.
# Both create .venv and install the project into it on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= vit_b16
# Pins that pip takes from the local wheel cache here; elsewhere they pull the CUDA build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q

.PHONY: install run test test-fast smoke bench gpu-check report docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(PIP) $(TORCH_PINS) 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import clip_xai, torch, torchvision, open_clip, hydra, wandb" && touch $(STAMP)

# The default experiment: ViT-B/16 (OpenAI weights) on the built-in sample images, a short
# eps sweep over the thesis methods, then the report. Offline: `make run MODEL=tiny`.
run: $(STAMP)
	$(BIN)/python -m clip_xai -m experiment=default model=$(MODEL)
	$(BIN)/python -m clip_xai.report outputs/default_$(MODEL)

test: $(STAMP)
	$(BIN)/python -m pytest -x -p no:cacheprovider --timeout=600

# Everything except the slow end-to-end subprocess runs.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -x -m "not slow"

# The quick bench by default (masks and steps reduced, rates scaled back and labelled; about 3 min
# on a 2-core CPU); `make bench FULL=1` runs the yaml defaults. e.g. BENCH_ARGS="--precision bf16"
bench: $(STAMP)
	$(BIN)/python -m clip_xai.bench $(if $(FULL),--full) $(BENCH_ARGS)

# The prepared GPU check (about 8 min on one H100): CUDA tests, bench per precision with the map
# agreement, RISE compiled vs eager, PGD/map-attack/ViT-L rows, a short thesis sweep with its
# projection; report + CSVs in outputs/gpu-check/. Without a GPU it stops (exit 2);
# `make gpu-check DRY=1` runs every step on the tiny model on the CPU. Then
# `python -m clip_xai.perf_tables` writes the tables into docs/performance.md.
gpu-check: $(STAMP)
	$(BIN)/python -m clip_xai.gpu_check $(if $(DRY),--dry)

report: $(STAMP)
	$(BIN)/python -m clip_xai.report outputs/default_$(MODEL)

# CPU smoke runs of every method through the real entrypoint on the tiny model:
# the 9 thesis methods x 4 eps (sensitivity), the 5 ABM-paper methods, and the methods of 2024-25
# papers (LeGrad, GEM, AttnLRP, second-order interactions with 2 path points) in both studies.
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

# The documentation site (mkdocs-material, API pages from the docstrings): broken links fail it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf outputs multirun .pytest_cache build dist site
