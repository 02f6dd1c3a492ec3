# Two commands: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch/torchvision are pinned here only (the library declares ranges in pyproject.toml)
CONSTRAINTS := constraints.txt

.PHONY: demo test lint install install-dev bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) examples/demo.py --out demo_out

test: lint
	$(PY) -m pytest -q tests

lint: install-dev
	$(PY) -m ruff check .

bench: install-dev
	$(PY) benchmarks/fashion_mnist.py

clean:
	rm -rf demo_out runs .pytest_cache
