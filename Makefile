# One entry point for people, the before-stop hook and CI.
#   make demo    set up (first time) and run the demo
#   make check   set up (first time), then lint, type-check, architecture contracts, all tests
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install check lint test demo bench clean

$(VENV)/.installed: pyproject.toml
	@echo "first run: installing torchrelay and its dependencies into $(VENV) (a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	@echo "installed: $(VENV)"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p torchrelay
	$(VENV)/bin/lint-imports

test: install
	$(VENV)/bin/pytest

check: lint test

demo: install
	$(VENV)/bin/torchrelay demo

bench: install
	$(PY) bench/bus.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
