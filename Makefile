# The README's commands. Each installs what it needs into .venv first (CPython 3.11 or newer).
#
# Installs come from requirements.lock: the exact versions the test suite passed with, so that an upstream release
# cannot change what a fresh machine gets. `make lock` refreshes the lock on purpose (newest releases within
# pyproject.toml's ranges); run `make test` on it and commit the two together. `make test-latest` runs the suite in a
# separate venv with no lock at all, to see what the next refresh would bring.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
UV_VERSION := 0.13.9
# One lock for every platform, resolved for CPython 3.11+, one version of each package for all of them.
LOCK_FLAGS := --universal --python-version 3.11 --fork-strategy fewest --extra test \
	--custom-compile-command "make lock"

.PHONY: install demo test test-all test-latest lock lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: $(LOCK) is made for CPython 3.11 or newer; this is " + sys.version.split()[0] + ". Run make with PYTHON=python3.11 (or newer).")'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --requirement $(LOCK)
	$(BIN)/pip install --quiet --no-deps --editable .
	$(BIN)/pip check
	touch $@

demo: install  ## the built-in demo: a complete offline fit on the CPU (class images, LoRA training, export)
	$(BIN)/python -m datamodules.toy_subject --out demo_data/toy_subject --resolution 32
	$(BIN)/python train.py fit --config configs/demo.yaml

test: install  ## the test suite (CPU, offline, tiny models)
	$(BIN)/python -m pytest

test-all: install  ## the suite including the tests marked slow
	$(BIN)/python -m pytest -m ""

test-latest:  ## the suite in a fresh venv with the newest releases pyproject.toml admits (no lock): a check by hand
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --editable ".[test]"
	.venv-latest/bin/pip freeze --exclude-editable > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest

lock: install  ## refresh requirements.lock from pyproject.toml (then run make test and commit both)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) --upgrade --output-file $(LOCK)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs demo_data lightning_logs wandb .pytest_cache
