# `make test`: the README's test command. On Linux it installs and preloads OpenBLAS, because
# MLX's CPU wheel ships a reference BLAS that is ~30x slower (README, Design: compute on Linux
# CPUs); the package works without it. ruff (lint and format, configured in pyproject.toml) runs
# before the tests.
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: test test-slow openblas

openblas:
	@if [ "$$(uname)" = Linux ] && [ ! -e $(OPENBLAS) ] && command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libopenblas0-pthread; fi

test: openblas
	$(PYTHON) -m pip install -q -e '.[test,examples]'
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(if $(wildcard $(OPENBLAS)),LD_PRELOAD=$(OPENBLAS)) $(PYTHON) -m pytest $(PYTEST_ARGS)

test-slow: openblas
	$(if $(wildcard $(OPENBLAS)),LD_PRELOAD=$(OPENBLAS)) $(PYTHON) -m pytest -m slow $(PYTEST_ARGS)
