# twinarm — a new user needs two commands: `make demo` and `make test` (each runs `make setup` itself).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# setup is redone only when the dependency pins change
STAMP := $(VENV)/.setup-$(shell cat pyproject.toml requirements.lock 2>/dev/null | sha256sum | cut -c1-16)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONDONTWRITEBYTECODE := 1

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-fast ui bench-grader bench-rl bench-peer faults screenshots clean-home

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## create .venv and install the pinned environment (idempotent; instant when done)

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) scripts/check_python.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.setup-*
	@touch $@
	@echo "environment ready: $(VENV)"

demo: setup ## run the embedded demo ablation (arith world, tiny model, CPU) and print where results are
	$(BIN)/twinarm run configs/demo.yaml

test: setup ## run the whole test suite (unit + end-to-end demo-sized runs)
	$(BIN)/python -m pytest -q

test-fast: setup ## unit tests only (skips the end-to-end runs)
	$(BIN)/python -m pytest -q -m "not e2e"

ui: setup ## start the Prefect UI (127.0.0.1:4200) and MLflow UI (127.0.0.1:5000) and serve the deployments
	$(BIN)/twinarm ui

bench-grader: setup ## grader throughput, latency and hard timeouts on the held-out 1030 (../shared/data/benchmarks)
	$(BIN)/python scripts/bench_grader.py ../shared/data/benchmarks

bench-rl: setup ## GRPO step time vanilla vs PMI-shift (needs `make demo` first), then demo wall time sequential vs Ray
	$(BIN)/python scripts/bench_rl.py step
	$(BIN)/python scripts/bench_rl.py demo

bench-peer: setup ## twinarm's GRPO step vs TRL's GRPOTrainer on identical work (needs `make demo` first; installs the bench extra)
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[bench]'
	$(BIN)/python scripts/bench_peer.py

faults: setup ## SIGKILL each stage at random points, rerun, compare with an uninterrupted run
	$(BIN)/python scripts/fault_inject.py

screenshots: setup ## docs/prefect-ablation-form.png: the Prefect UI's ablation form, via headless Chromium
	$(BIN)/python scripts/screenshot_ui.py docs/prefect-ablation-form.png

clean-home: ## delete .twinarm/ (all runs, lineage, MLflow store)
	rm -rf .twinarm
