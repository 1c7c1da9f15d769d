# The README's commands. `make test` is what CI runs (.ci/run calls it and nothing else).
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?= -n 2   # both cores (pytest-xdist); one thread per worker (tests/conftest.py)

.PHONY: setup system-deps lint test demo bench transformers-tests

## setup: create .venv (if missing) and install hf-vlm with its dev extras, plus transformers' own test suite
setup: $(STAMP) transformers-tests

# Bytecode at install (--compile-bytecode), as pip does and uv does not by default: where PYTHONDONTWRITEBYTECODE is
# set (as on CI), every process would otherwise compile torch and transformers again (import 15 s -> 6.5 s; +18 s once).
$(STAMP): pyproject.toml setup.py
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install --compile-bytecode --python $(PYTHON) -e ".[dev]"
	touch $@

## transformers-tests: the installed transformers version's own tests/ (ModelTesterMixin, run against our models by
## tests/test_transformers_common.py), from that version's sdist on PyPI, into .transformers-tests/<version>/tests.
## The sdist ships tests/*.py but not tests/generation/ nor tests/exporters/ (see tests/transformers_testsuite.py).
TF_TESTS := .transformers-tests
transformers-tests: $(STAMP)
	@v=$$($(PYTHON) -c 'import transformers; print(transformers.__version__)'); \
	test -f $(TF_TESTS)/$$v/tests/test_modeling_common.py || { \
	  rm -rf $(TF_TESTS)/$$v.tmp && mkdir -p $(TF_TESTS)/$$v.tmp && \
	  $(PYTHON) -m pip download -q --no-deps --no-binary :all: "transformers==$$v" -d $(TF_TESTS)/$$v.tmp && \
	  tar -xzf $(TF_TESTS)/$$v.tmp/transformers-$$v.tar.gz -C $(TF_TESTS)/$$v.tmp --strip-components=1 \
	    transformers-$$v/tests && rm $(TF_TESTS)/$$v.tmp/transformers-$$v.tar.gz && \
	  rm -rf $(TF_TESTS)/$$v && mv $(TF_TESTS)/$$v.tmp $(TF_TESTS)/$$v && \
	  echo "transformers $$v tests: $(TF_TESTS)/$$v/tests"; }

## system-deps: Debian's chromium for the Space's browser tests (Playwright drives /usr/bin/chromium;
## `playwright install` would download a browser)
## DeepSpeed compiles a small CPU op with g++ on its first launch.
system-deps:
	@{ test -x /usr/bin/chromium && command -v g++ >/dev/null; } || { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium g++; }

## lint: ruff over the whole repository
lint: setup
	$(VENV)/bin/ruff check .

## test: setup, lint, then every test (slow, distributed and browser ones included)
test: setup system-deps lint
	$(PYTHON) -m pytest $(PYTEST_ARGS)

## demo: train small CoCa and BLIP-2 models on synthetic scenes, evaluate them, serve the Space
## (DEMO_ARGS="--no-serve" for a non-interactive run, "--force" to retrain)
DEMO_ARGS ?=
demo: setup
	$(VENV)/bin/hf-vlm demo $(DEMO_ARGS)

## bench: hf-vlm vs open_clip / transformers on the same weights, and the training data loader vs a plain
## datasets loop (about 16 min on 2 CPU cores); results, table, plot and loader workers per GPU in
## benchmarks/results/cpu (BENCH_ARGS="--full --device cuda --dtype bfloat16" on a GPU)
BENCH_ARGS ?=
bench: setup
	$(PYTHON) -m benchmarks.run_all $(BENCH_ARGS)
