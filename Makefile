# Reelrank: the two README commands (`make run`, `make test`) and a few helpers. `make help` lists them.
SHELL := /bin/bash
VENV := .venv
PYTHON ?= python3
PROFILE ?= default
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export BENTOML_DO_NOT_TRACK := true
# the BentoML model and bento store of this checkout (BentoML's own default is ~/bentoml)
export BENTOML_HOME ?= $(CURDIR)/.bentoml
PORT ?= 3000
export DVC_NO_ANALYTICS := true
# Hydra/Lightning/Matplotlib write nothing into $HOME by surprise in CI
export MPLBACKEND := Agg

.DEFAULT_GOAL := help
.PHONY: help setup system-deps spark-deps run serve image image-smoke bento-store tune test unit integration params accept-baseline lock \
	sync-check lint docs bench-peers clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install the locked dependencies (torch==2.13.0 CPU first)

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -r requirements.lock
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

system-deps: ## install the Debian packages the tests need when missing: chromium (report), postgresql (sweeps), buildah etc. (image), nginx (deploy), Java (Spark split)
	@missing=""; command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	for tool in buildah podman runc debootstrap curl nginx; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; fi

run: setup ## compose conf/ for PROFILE (default: default) into params.yaml and reproduce the pipeline
	python -m reelrank.core profile=$(PROFILE)
	dvc repro

# the bento `make run` packaged into models/bento; bento-store imports it into $BENTOML_HOME when the store lacks it
BENTO_TAG = $(shell python3 -c 'import json; print(json.load(open("models/bento/bento.json"))["bento"])' 2>/dev/null)

bento-store: setup
	@test -n "$(BENTO_TAG)" || { echo "no bento yet: run make run (or dvc repro package)"; exit 1; }
	@bentoml get $(BENTO_TAG) > /dev/null 2>&1 || bentoml import "$(CURDIR)/models/bento/reelrank.tar"

serve: bento-store ## serve the packaged bento on 127.0.0.1:$PORT (default 3000); `make run` builds it
	exec bentoml serve $(BENTO_TAG) --host 127.0.0.1 --port $(PORT)

# scripts/image.sh: base image (scripts/base-image.sh, cached in podman's store), CPU torch wheel, buildah build
image: system-deps bento-store ## build an OCI image of the packaged bento with buildah, tagged like the bento
	scripts/image.sh $(BENTO_TAG)

image-smoke: ## run `make image`'s image on 127.0.0.1, probe /readyz, /recommend and /similar, stop it
	@test -n "$(BENTO_TAG)" || { echo "no bento yet: run make run, then make image"; exit 1; }
	scripts/image-smoke.sh $(BENTO_TAG)

test: setup system-deps unit integration ## notebook unit tests (nbdev-test) then integration tests (pytest)

unit: setup ## unit tests that live in the notebooks
	nbdev-test --n-workers 2 --skip-folder-re '^(reports|explore)$$'

integration: setup spark-deps ## integration tests in tests/ (pytest)
	pytest

# the optional `spark` group of pyproject.toml (PySpark, for tests/test_split_spark.py), kept out of requirements.lock;
# --no-deps because the group pins py4j, PySpark's one dependency, beside it
spark-deps: $(VENV)/.spark-installed ## install the optional `spark` group (PySpark) that the Spark split test needs

$(VENV)/.spark-installed: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['spark'], sep='\n')" \
	  | $(VENV)/bin/pip install --quiet --no-deps -r /dev/stdin
	touch $@

params: setup ## compose conf/ into params.yaml without running: make params PROFILE=smoke
	python -m reelrank.core profile=$(PROFILE)

tune: setup ## Optuna sweep of one model: make tune MODEL=ease [TRIALS=20] [STORAGE=postgresql://user@host/db]
	reelrank tune model=$(MODEL) $(if $(TRIALS),sweep.n_trials=$(TRIALS)) $(if $(STORAGE),sweep.storage=$(STORAGE))

accept-baseline: setup ## record the selected model's test metrics as the baseline: make accept-baseline PROFILE=smoke
	python -m reelrank.report accept-baseline --profile $(PROFILE)

lock: setup ## re-pin every dependency from the current .venv (the optional spark group stays out)
	{ head -2 requirements.lock; pip freeze --exclude-editable --exclude pyspark --exclude py4j | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

sync-check: setup ## fail when notebooks and src/reelrank are out of sync
	nbdev-clean && nbdev-export
	git status --porcelain -- notebooks src
	test -z "$$(git status --porcelain -- notebooks src)"

lint: setup ## ruff over the exported package and tests
	ruff check src tests

# nbdev's processing (what nbdev-proc-nbs does, minus its Quarto set-up, which would download and install Quarto)
# runs the imports, exported cells and show_doc calls of each changed notebook into _proc/; MkDocs then renders
# _proc/ and docs/ into _site/ (docs/hooks/notebooks.py turns the processed notebooks into pages). The theme's
# end-of-life banner is silenced: docs/site.md states it.
docs: setup ## build the documentation site from the notebooks into _site/ (open _site/index.html)
	python -c "from nbdev.serve import proc_nbs; proc_nbs()"
	NO_MKDOCS_2_WARNING=1 mkdocs build

# RecTools conflicts with the lock (numpy<2, pandas<3, pytorch-lightning<=2.5.2): its own venv, torch first as in setup,
# then the `peers` group of pyproject.toml and the project itself without its dependencies
PEERS_VENV := .venv-peers

$(PEERS_VENV)/.installed: pyproject.toml
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet torch==2.13.0
	$(PEERS_VENV)/bin/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['peers'], sep='\n')" \
	  | $(PEERS_VENV)/bin/pip install --quiet -r /dev/stdin
	$(PEERS_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

bench-peers: setup $(PEERS_VENV)/.installed ## our EASE^R, iALS, SASRec beside RecTools' on the same split (after make run; ~15 min)
	python tests/benchmarks/bench_peers.py

clean: ## remove the virtual environment
	rm -rf $(VENV)
