# The front door of the workbook.  Every target sets up what it needs:
# a local virtual environment in .venv (torch first, pinned to the build
# this machine ships, then the project itself), reused by later calls.

PYTHON ?= python3
VENV ?= .venv
# Installed before the project so that the project's torch range is already
# satisfied; override with e.g. TORCH_SPEC="torch==2.13.0 --index-url ..." for a CUDA build.
TORCH_SPEC ?= torch==2.13.0

PROFILE ?= quick

PY := $(VENV)/bin/python
STAMP := $(VENV)/.ktlib-installed

# numba (used by umap-learn) needs a writable cache; matplotlib likewise.
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba
export MPLCONFIGDIR ?= $(CURDIR)/.cache/matplotlib
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help setup reproduce test browser-test bench gpu-check lint lab clean distclean

help:
	@echo "make reproduce   run every notebook in order on the built-in (simulated) data (PROFILE=quick|smoke|paper)"
	@echo "make test        run the test suite"
	@echo "make browser-test  open each notebook with a widget in JupyterLab in headless Chromium, run it, move the widget"
	@echo "make bench       ms per training step (quick, paper aligned and unaligned, quick on word counts) and peak memory on this device"
	@echo "make gpu-check   on a GPU machine, once: CUDA tests, step times, runs per device, Table I timed (about 8 min)"
	@echo "make lab         open JupyterLab with the project's kernel"
	@echo "make lint        ruff on code and notebooks"
	@echo "make clean       remove caches, runs and generated figures (keeps .venv and data)"
	@echo "make distclean   also remove .venv and the simulator cache"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setting up $(VENV): $(TORCH_SPEC), then ktlib and its dependencies (a minute or two, once)"
	$(PY) -m pip install -qq $(TORCH_SPEC)
	$(PY) -m pip install -qq -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name ktlib --display-name "Python (ktlib)" >/dev/null
	@mkdir -p $(NUMBA_CACHE_DIR) $(MPLCONFIGDIR)
	@touch $@

reproduce: $(STAMP)
	$(PY) -m ktlib reproduce --profile $(PROFILE)

test: $(STAMP)
	$(PY) -m ruff check ktlib tests notebooks
	$(PY) -m pytest

# Debian's chromium and chromium-driver (installed here when apt-get can: as root, else through sudo; a fresh
# machine's package lists are fetched first), selenium from PyPI.  The notebooks run in the smoke profile.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser-test: $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		($(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null || \
		 ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null)) || \
		echo "could not install chromium and chromium-driver; install them and run again"
	$(PY) -m pip install -qq selenium
	$(PY) -m pytest -v -rs tests/test_browser.py
	@echo "screenshots: runs/browser/"

bench: $(STAMP)
	$(PY) -m ktlib.bench

# On a machine with a GPU (install a CUDA torch first: TORCH_SPEC="torch==2.13.0 --index-url ..."); the figures
# also go to runs/gpu-check.json, rewritten after each part.  GPU_CHECK_ARGS=--dry exercises it on the CPU at toy
# sizes.  Where python3 already has a CUDA torch and there is no network: make gpu-check PY=python3 STAMP=
# (the check needs torch, numpy, pandas, tqdm, filelock and pytest only).
gpu-check: $(STAMP)
	$(PY) -m ktlib.gpucheck --out runs/gpu-check.json $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check ktlib tests notebooks

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

clean:
	rm -rf .cache .pytest_cache .ruff_cache runs figures/*.png figures/*.pdf
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) data/sim
