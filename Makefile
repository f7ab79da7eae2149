# twinarm — a new user needs two commands: `make demo` and `make test` (each runs `make setup` itself).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# setup is redone only when the dependency pins change
STAMP := $(VENV)/.setup-$(shell cat pyproject.toml requirements.lock 2>/dev/null | sha256sum | cut -c1-16)
# the vLLM engine's own environment (it cannot share .venv: docs/vllm.md); rebuilt only when its pins change
VLLM_VENV ?= .venv-vllm
VLLM_REQUIREMENTS ?= requirements-vllm.txt
VLLM_STAMP := $(VLLM_VENV)/.setup-$(shell cat $(VLLM_REQUIREMENTS) 2>/dev/null | sha256sum | cut -c1-16)
VLLM_TORCH := $(shell grep -E '^torch==' $(VLLM_REQUIREMENTS) 2>/dev/null)
# where torch's CPU build comes from when this machine's pip does not already find it
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONDONTWRITEBYTECODE := 1

.DEFAULT_GOAL := help
.PHONY: help setup setup-vllm demo test test-fast ui bench-grader grader-differential bench-decoys bench-rl bench-cost bench-peer bench-engines bench-ranks bench-masa faults signal-cases mutation-resume screenshots clean-home sensitivity

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-20s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## create .venv and install the pinned environment (idempotent; instant when done)

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) scripts/check_python.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.setup-*
	@touch $@
	@echo "environment ready: $(VENV)"

setup-vllm: $(VLLM_STAMP) ## create .venv-vllm for eval.engine=vllm (CPU build; GPU: docs/vllm.md), smoke-checked

# no file prerequisite: the stamp's name is the pins' content hash, and a fresh clone's newer mtime must not
# rebuild a cached environment (CI keeps it between runs)
$(VLLM_STAMP):
	@# pins changed (an older stamp exists): start from an empty venv, so nothing of the old pins lingers
	@if ls $(VLLM_VENV)/.setup-* >/dev/null 2>&1; then rm -rf $(VLLM_VENV); fi
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
ifneq ($(VLLM_TORCH),)
	$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM_TORCH)' \
	  || $(VLLM_VENV)/bin/python -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) '$(VLLM_TORCH)'
endif
	$(VLLM_VENV)/bin/python -m pip install -q -r $(VLLM_REQUIREMENTS)
ifeq ($(findstring +cpu,$(VLLM_TORCH)),+cpu)
	@# with CPU torch, pip's CUDA builds of these break `from vllm import LLM` (torchvision::nms does not exist)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	@$(VLLM_VENV)/bin/python evals/vllm_worker.py --smoke 2>$(VLLM_VENV)/smoke.log \
	  || { tail -n 30 $(VLLM_VENV)/smoke.log; echo "vLLM smoke generation failed (full log: $(VLLM_VENV)/smoke.log)"; exit 1; }
	@touch $@
	@echo "vLLM engine environment ready: $(VLLM_VENV) ($$(du -sh $(VLLM_VENV) | cut -f1))"

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

grader-differential: setup ## the grader vs verl's math rewards on the held-out 1030 golds x renderings and decoys
	$(BIN)/python scripts/grader_differential.py --all --data-dir ../shared/data/benchmarks

bench-decoys: setup ## share of the demo's RL problems PMI-shift can score (gold/decoy of equal token length)
	$(BIN)/python scripts/bench_decoys.py

bench-rl: setup ## GRPO step time vanilla vs PMI-shift (needs `make demo` first), then demo wall time sequential vs Ray
	$(BIN)/python scripts/bench_rl.py step
	$(BIN)/python scripts/bench_rl.py demo

bench-cost: setup ## cost growth on the demo's model (needs `make demo` first): GRPO step vs batch and length, held-out vs suite size -> docs/cost-growth.png
	$(BIN)/python scripts/bench_cost.py --home $${TWINARM_HOME:-.twinarm}

bench-ranks: setup ## the demo's base model trained on 1 vs 2 data-parallel ranks (sft/ranks.py): seconds per step, speedup
	$(BIN)/python scripts/bench_ranks.py

bench-masa: setup ## MASA-efficient vs GRPO, 3 seeds: gating/cutoff precision and F1, tokens saved, time-to-baseline (needs configs/masa.yaml's SFT in TWINARM_HOME: twinarm run configs/masa.yaml --arms grpo --seeds 0 --rl-steps 11)
	$(BIN)/python scripts/bench_masa.py run --home $${TWINARM_HOME:-.twinarm} --out $${TWINARM_HOME:-.twinarm}/bench-masa

bench-engines: setup setup-vllm ## held-out generation, HF vs vLLM on the same work: start-up and samples/s
	$(BIN)/python scripts/bench_engines.py

bench-peer: setup ## twinarm's GRPO step vs TRL's GRPOTrainer on identical work (needs `make demo` first; installs the bench extra)
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[bench]'
	$(BIN)/python scripts/bench_peer.py

sensitivity: setup ## positive and placebo controls vs the twin control, 3 seeds (configs/sensitivity.yaml): verdicts, CIs, wall time (~36 min on an idle 2-core box)
	$(BIN)/python scripts/sensitivity.py

faults: setup ## SIGKILL each stage at random points, rerun, compare with an uninterrupted run
	$(BIN)/python scripts/fault_inject.py

signal-cases: setup ## Ctrl-C / SIGTERM on `twinarm run` and `twinarm ui`, serve beside ui: exit codes, leftovers
	$(BIN)/python scripts/signal_cases.py

mutation-resume: setup ## break the optimizer / weights / step restore on a copy: the SIGKILL-resume test must fail
	$(BIN)/python scripts/mutation_resume.py

screenshots: setup ## Prefect UI screenshots via headless Chromium: the ablation form; with RUN_HOME=<home>, its last run
	$(BIN)/python scripts/screenshot_ui.py docs/prefect-ablation-form.png
	$(if $(RUN_HOME),$(BIN)/python scripts/screenshot_ui.py --flow-run $(RUN_HOME) --out docs)

clean-home: ## delete .twinarm/ (all runs, lineage, MLflow store)
	rm -rf .twinarm
