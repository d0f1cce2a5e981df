# retina-compress: every target creates .venv and installs the project on first use.
# Run targets pass ARGS through as Hydra overrides:
#   make dr-distill ARGS="distill.temperature=2 trainer.max_epochs=5"
#   make dr-distill ARGS="-m distill.temperature=2,4,8"

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
ARGS ?=
MLFLOW_PORT ?= 5000
# the store `make mlflow-ui` serves (the e2e test points it at a store of its own)
MLFLOW_STORE ?= $(CURDIR)/mlruns
CHROMIUM ?= /usr/bin/chromium
PYTEST_FLAGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv dr-distill glaucoma-iterations bench report predict evaluate test test-full test-e2e browser lint format mlflow-ui clean

help: ## Show the targets
	@awk 'BEGIN {FS = ":.*## "}; /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(INSTALLED): pyproject.toml
	@echo ">> creating $(VENV) with $(PYTHON) and installing retina-compress (first use only)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# hydra-optuna-sweeper 1.3.0, the newest release for hydra-core 1.3, still declares optuna<3, and Optuna 2's
	@# study storage fails on SQLAlchemy 2, which MLflow 3's server and UI need. Its code runs on the Optuna 4 that
	@# pyproject.toml installs (Optuna keeps converting the distribution classes it uses), so it comes without its
	@# pins. (Its 1.4 pre-releases support Optuna 4 but need hydra-core 1.4, itself a pre-release.)
	$(BIN)/python -m pip install --quiet --no-deps 'hydra-optuna-sweeper==1.3.0'
	@touch $@

venv: $(INSTALLED) ## Create .venv and install the project

dr-distill: $(INSTALLED) ## Diabetic-retinopathy teacher -> student distillation (ARGS: Hydra overrides)
	$(BIN)/python -m experiments.train_dr $(ARGS)

glaucoma-iterations: $(INSTALLED) ## Optic-disc segmentation compressed 64 -> 32 -> 16 -> 8 by pruning and distillation (ARGS)
	$(BIN)/python -m experiments.glaucoma_chain $(ARGS)

bench: $(INSTALLED) ## CPU benchmark of the latest DR and glaucoma runs: fp32/channels-last/bf16/ONNX fp32/int8, sizes, Pareto plot
	$(BIN)/python -m experiments.bench $(ARGS)

report: $(INSTALLED) ## HTML + Markdown report of the latest (or chosen) runs from the MLflow store (ARGS)
	$(BIN)/python -m experiments.report $(ARGS)

predict: $(INSTALLED) ## Grade / segment a folder with a run's ONNX model (ARGS="model=<run id|run or stage folder> input=<folder> [output=… precision=int8|fp32 gradcam=true overwrite=true]")
	$(BIN)/python -m experiments.predict $(ARGS)

evaluate: $(INSTALLED) ## Score a model on any labelled set, every image (ARGS="model=<run|stage|bundle|run id> data=aptos|eyepacs|disc_folder data.root=<dir> [precision=fp32]")
	$(BIN)/python -m experiments.evaluate $(ARGS)

test: $(INSTALLED) ## Fast test suite (no slow or browser tests), the CI command
	$(BIN)/python -m pytest -m "not slow and not e2e" $(PYTEST_FLAGS)

test-full: $(INSTALLED) browser postgres ## Every test: the slow training ones and the browser ones included
	$(BIN)/python -m pytest $(PYTEST_FLAGS)

test-e2e: $(INSTALLED) browser postgres ## The MLflow UI checked in headless Chromium (screenshots in test-artifacts/)
	$(BIN)/python -m pytest -m e2e $(PYTEST_FLAGS)

# Debian's Chromium (playwright's own browser download would need the internet); installed when missing and
# this is root (CI), otherwise the message says what to install.
browser:
	@if [ ! -x "$(CHROMIUM)" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo ">> installing Debian's chromium for the browser tests"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "The browser tests need Chromium at $(CHROMIUM): sudo apt-get install chromium (or CHROMIUM=<path>)"; \
			exit 1; \
		fi; \
	fi

lint: $(INSTALLED) ## ruff
	$(BIN)/ruff check .

format: $(INSTALLED) ## ruff --fix and format imports
	$(BIN)/ruff check --fix .

mlflow-ui: $(INSTALLED) ## Browse runs at http://127.0.0.1:$(MLFLOW_PORT) (the store in mlruns/)
	@mkdir -p "$(MLFLOW_STORE)/artifacts"
	$(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(MLFLOW_STORE)/mlflow.db}" \
		--default-artifact-root "$(MLFLOW_STORE)/artifacts" --host 127.0.0.1 --port $(MLFLOW_PORT)

# Shared MLflow tracking server (experiments/tracking_server.py): PostgreSQL and `mlflow server`, their data,
# artifacts, logs and pid file in TRACKING_DIR. TRACKING_HOST=0.0.0.0 serves a team (behind a firewall or a
# reverse proxy); PostgreSQL itself listens on 127.0.0.1 only. stdout is only the line to export:
#   eval "$(make -s tracking-server)"
TRACKING_DIR ?= $(CURDIR)/.tracking
TRACKING_HOST ?= 127.0.0.1
TRACKING_PORT ?= 5001
TRACKING_PG_PORT ?= 5433
# extra Host headers the server accepts (a DNS name or proxy address teammates use), comma-separated
TRACKING_ALLOWED_HOSTS ?=
.PHONY: tracking-server tracking-server-stop tracking-server-status postgres

tracking-server: $(INSTALLED) postgres ## Shared MLflow server on PostgreSQL (http://127.0.0.1:5001, data in .tracking/): prints the MLFLOW_TRACKING_URI to export
	@$(BIN)/python -m experiments.tracking_server start --dir "$(TRACKING_DIR)" --host $(TRACKING_HOST) \
		--port $(TRACKING_PORT) --pg-port $(TRACKING_PG_PORT) $(if $(TRACKING_ALLOWED_HOSTS),--allowed-hosts "$(TRACKING_ALLOWED_HOSTS)")

tracking-server-stop: $(INSTALLED) ## Stop the shared tracking server (MLflow, then PostgreSQL); its data stays
	@$(BIN)/python -m experiments.tracking_server stop --dir "$(TRACKING_DIR)"

tracking-server-status: $(INSTALLED) ## Whether the shared tracking server runs, and its address
	@$(BIN)/python -m experiments.tracking_server status --dir "$(TRACKING_DIR)"

# Debian's PostgreSQL server binaries (/usr/lib/postgresql/<version>/bin), for make tracking-server and its e2e
# test; installed when missing and this is root (CI), otherwise the message says what to install. Messages go
# to stderr, so that `eval "$(make -s tracking-server)"` reads the export line only.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo ">> installing Debian's postgresql for the shared tracking server" >&2; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
		else \
			echo "The shared tracking server needs PostgreSQL: sudo apt-get install postgresql" >&2; \
			exit 1; \
		fi; \
	fi

clean: ## Remove caches (.cache, __pycache__, tool caches); never mlruns/ or outputs/
	rm -rf .cache .pytest_cache .ruff_cache build *.egg-info test-artifacts
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
