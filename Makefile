# The two commands a new machine needs: `make demo` and `make test`. Both install everything
# into .venv first (python3 >= 3.11 is the only prerequisite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo up test test-unit test-integration test-e2e clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,rocksdb]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/orderpipe demo

up: install
	$(VENV)/bin/orderpipe up

test: install
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest tests/unit

test-integration: install
	$(PY) -m pytest tests/integration

test-e2e: install
	$(PY) -m pytest tests/e2e

clean:
	rm -rf .data build *.egg-info .pytest_cache
