# AsymKD: `make demo` runs the main job on synthetic data; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
QGIS_VENV ?= .venv-qgis
ENGINE := $(VENV)/.installed
QGIS_ENV := $(QGIS_VENV)/.installed
OUT ?= runs
EUROSAT ?= ../shared/data/eurosat

.PHONY: demo test lint test-backend test-plugin bench gpu-check env qgis-env package deploy screenshot clean

env: $(ENGINE)

$(ENGINE): backend/requirements.txt backend/requirements-test.txt backend/requirements-dask.txt backend/pyproject.toml
	tools/system-deps.sh engine
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r backend/requirements.txt -r backend/requirements-test.txt
	$(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e backend
	touch $@

demo: $(ENGINE)
	$(VENV)/bin/asymkd run --demo --out $(OUT)/demo

# the system's QGIS and GDAL first: engine tests open the engine's GeoPackages with them
test: lint $(QGIS_ENV)
	$(MAKE) --no-print-directory test-backend test-plugin

# ruff and mypy (settings in pyproject.toml) and the Qt6 check, before any test runs.
LINT_PATHS := backend asymkd_qgis tests tools
lint: $(ENGINE) qt6-check
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy

test-backend: $(ENGINE)
	$(VENV)/bin/python -m pytest -q tests/backend

test-plugin:
	@if [ -d tests/plugin ]; then $(MAKE) --no-print-directory _test-plugin; else echo "no plugin tests yet"; fi

bench: $(ENGINE)
	$(VENV)/bin/asymkd bench train
	$(VENV)/bin/asymkd bench classify
	$(VENV)/bin/asymkd bench accuracy --data $(EUROSAT)

gpu-check: $(ENGINE)
	PY=$(VENV)/bin/python tools/gpu_check.sh

clean:
	rm -rf $(VENV) $(QGIS_VENV) build dist *.zip

# -- QGIS plugin ------------------------------------------------------------------------
# Plugin tests run in Debian's QGIS 3.22 Python (numpy 1.x) through a venv that sees the
# system packages and adds only pytest and pytest-qgis; the engine runs from $(VENV).
QGIS_TEST_PINS := pytest==9.2.0 pytest-qgis==5.0.2
PLUGIN_ZIP ?= asymkd_qgis.zip
QGIS_PROFILE ?= default
QGIS_PROFILES_DIR ?=
SCREENSHOTS ?= out/screenshots
EUROSAT_MAP ?= ../shared/data/eurosat_map
PLUGIN_ENV := QT_QPA_PLATFORM=offscreen ASYMKD_ENGINE_PYTHON=$(abspath $(VENV))/bin/python
BUNDLE_PYTHON ?= 3.11
BUNDLE_VARIANTS ?= cpu,cuda
BUNDLE_PLATFORM ?= manylinux_2_28_x86_64
.PHONY: _test-plugin bench-plugin qt6-check bundle

qgis-env: $(QGIS_ENV)

$(QGIS_ENV):
	tools/system-deps.sh qgis
	test -x $(QGIS_VENV)/bin/python || /usr/bin/python3 -m venv --system-site-packages $(QGIS_VENV)
	$(QGIS_VENV)/bin/python -m pip install -q $(QGIS_TEST_PINS)
	@$(QGIS_VENV)/bin/python -c "import numpy, sys; from osgeo import gdal; sys.exit(int(numpy.__version__.split('.')[0]) >= 2)" \
	  || { echo "numpy 2 is visible to QGIS's Python: its GDAL bindings need numpy 1.x" >&2; exit 1; }
	touch $@

_test-plugin: $(ENGINE) $(QGIS_ENV)
	$(PLUGIN_ENV) $(QGIS_VENV)/bin/python -m pytest -q tests/plugin

package:
	$(PYTHON) tools/plugin_package.py zip --out $(PLUGIN_ZIP)

# Fails on Qt5-only code in the plugin (QGIS 4 is Qt6-only).
qt6-check:
	$(PYTHON) tools/qt6_check.py asymkd_qgis

# One archive that installs plugin and engine without network (Linux; torch CPU and CUDA builds).
bundle: $(ENGINE)
	$(VENV)/bin/python tools/bundle.py --python-version $(BUNDLE_PYTHON) --variants $(BUNDLE_VARIANTS) \
	  --platform $(BUNDLE_PLATFORM)

deploy: package
	$(PYTHON) tools/plugin_package.py deploy --zip $(PLUGIN_ZIP) --profile $(QGIS_PROFILE) \
	  $(if $(QGIS_PROFILES_DIR),--profiles-dir $(QGIS_PROFILES_DIR))

screenshot: $(ENGINE) $(QGIS_ENV)
	$(PLUGIN_ENV) $(QGIS_VENV)/bin/python tools/plugin_screenshots.py --out $(SCREENSHOTS)

bench-plugin: $(ENGINE) $(QGIS_ENV)
	$(PLUGIN_ENV) $(QGIS_VENV)/bin/python tools/plugin_bench_map.py --data $(EUROSAT_MAP) --out $(OUT)/plugin-map
