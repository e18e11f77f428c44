# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install install-dev demo test lint docs bench bench-training bench-threads

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .[plots,images]

install-dev:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .[dev,docs]

demo: install
	cdeq demo --out runs/demo

lint:
	$(PYTHON) -m ruff check src tests benchmarks

# The documentation site (mkdocs.yml) into site/ (not committed). A broken link, a page left out
# of the navigation or a docstring that does not parse fails the build; `make test` builds it too
# (tests/test_docs.py). `mkdocs serve` shows it while you edit.
docs:
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

test: install-dev lint
	$(PYTHON) -m pytest tests

bench: install-dev
	$(PIP) install -q torchdeq
	$(PYTHON) benchmarks/solvers.py

# One teacher training step, cdeq against TorchDEQ (benchmarks/results/training.json).
bench-training: install-dev
	$(PIP) install -q torchdeq
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/training.py

# The demo's teacher training idle and beside busy processes, by thread setting
# (benchmarks/results/threads.json); run it on an otherwise idle machine.
bench-threads: install-dev
	$(PYTHON) benchmarks/threads.py
