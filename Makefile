# Entry points (see README): `make quickstart`, `make test` (what CI runs: every test) and `make test-fast`
# (the inner loop: everything not marked slow, i.e. no CLI training runs). All create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# torch/torchvision pinned to the tested release; set TORCH_SPEC="" to keep an existing install.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -n 2 -q

BIN := $(VENV)/bin

.PHONY: install quickstart test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q $(TORCH_SPEC); fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

quickstart: install
	$(BIN)/distillctl run --recipe quickstart --out runs/quickstart

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS) -m "not slow"

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
