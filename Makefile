# `make demo`: set up and run the end-to-end demo. `make test`: set up and run the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo

.PHONY: demo test setup proto bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: a plain resolver run would pull a CUDA build (several GB) on Linux.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/split-demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

proto: $(STAMP)
	$(BIN)/python -m splitnet.protogen

bench: $(STAMP)
	$(BIN)/python benchmarks/transport.py

clean:
	rm -rf $(VENV) out
