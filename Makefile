# Two entry points that set everything up on a fresh machine:
#   make demo   generate the demo set, train on it with the bundled backbone, print test mAP
#   make test   lint (ruff), type-check (mypy), then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are installed first, as a matching pair (override for other platforms)
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/patchnet demo

test: lint $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check patchnet tools benchmarks tests
	$(BIN)/ruff format --check patchnet tools benchmarks tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .cache data/demo checkpoints/demo
