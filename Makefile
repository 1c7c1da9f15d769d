# The README's commands. `make test` is what CI runs (.ci/run calls it and nothing else).
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup lint test

## setup: create .venv (if missing) and install hf-vlm with its dev extras, plus system packages
setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install --python $(PYTHON) -e ".[dev]"
	touch $@

## lint: ruff over the whole repository
lint: setup
	$(VENV)/bin/ruff check .

## test: setup, lint, then every test (slow, distributed and browser ones included)
test: setup lint
	$(PYTHON) -m pytest $(PYTEST_ARGS)
