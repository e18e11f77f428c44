# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install install-dev demo test lint bench

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .[plots,images]

install-dev:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .[dev]

demo: install
	cdeq demo --out runs/demo

lint:
	$(PYTHON) -m ruff check src tests benchmarks

test: install-dev lint
	$(PYTHON) -m pytest tests

bench: install-dev
	$(PIP) install -q torchdeq
	$(PYTHON) benchmarks/solvers.py
