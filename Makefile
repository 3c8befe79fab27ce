# AsymKD: `make demo` runs the main job on synthetic data; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
QGIS_VENV ?= .venv-qgis
ENGINE := $(VENV)/.installed
QGIS_ENV := $(QGIS_VENV)/.installed
OUT ?= runs
EUROSAT ?= ../shared/data/eurosat

.PHONY: demo test test-backend test-plugin bench env qgis-env package deploy screenshot clean

env: $(ENGINE)

$(ENGINE): backend/requirements.txt backend/requirements-test.txt backend/pyproject.toml
	tools/system-deps.sh engine
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r backend/requirements.txt -r backend/requirements-test.txt
	$(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e backend
	touch $@

demo: $(ENGINE)
	$(VENV)/bin/asymkd run --demo --out $(OUT)/demo

test: test-backend test-plugin

test-backend: $(ENGINE)
	$(VENV)/bin/python -m pytest -q tests/backend

test-plugin:
	@if [ -d tests/plugin ]; then $(MAKE) --no-print-directory _test-plugin; else echo "no plugin tests yet"; fi

bench: $(ENGINE)
	$(VENV)/bin/asymkd bench train
	$(VENV)/bin/asymkd bench classify
	$(VENV)/bin/asymkd bench accuracy --data $(EUROSAT)

clean:
	rm -rf $(VENV) $(QGIS_VENV) build dist *.zip
