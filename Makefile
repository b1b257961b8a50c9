# The README's commands. Each installs what it needs into .venv first (Python 3.10+; 3.11 on the dev machines).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: install  ## the built-in demo: a complete offline fit on the CPU (class images, LoRA training, export)
	$(BIN)/python -m datamodules.toy_subject --out demo_data/toy_subject --resolution 32
	$(BIN)/python train.py fit --config configs/demo.yaml

test: install  ## the test suite (CPU, offline, tiny models)
	$(BIN)/python -m pytest

test-all: install  ## the suite including the tests marked slow
	$(BIN)/python -m pytest -m ""

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs demo_data lightning_logs wandb .pytest_cache
