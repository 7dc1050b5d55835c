# `make demo`: set up and run the end-to-end demo. `make test`: set up and run the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo
# Where torch and torchvision come from: PyTorch's CPU index, or e.g. .../whl/cu128 for CUDA.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# What `make setup` installs besides the core: every role and the test tools.
EXTRAS ?= all,test
# pip retries an index it cannot reach with growing sleeps between tries (5 by default): where
# TORCH_INDEX is out of reach and a local wheel cache serves torch, that is dead time.
PIP_RETRIES ?= 1
PIP := $(BIN)/pip --disable-pip-version-check -q --retries $(PIP_RETRIES)

.PHONY: demo test test-fast test-hosts setup constraints proto bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch and torchvision first, alone (--no-deps) from TORCH_INDEX: from the default index pip
# pulls a CUDA build (several GB) on Linux. Their dependencies, and everything else, come from
# the default index in the second step. The pip configuration's find-links still apply, so a
# machine whose local wheel cache holds the pinned CPU torch installs it even where
# TORCH_INDEX cannot be reached. constraints.txt makes every version exact.
# pip byte-compiles what it installs one file at a time; compileall afterwards uses every core
# (13,467 files, 48 s of the 116 s install on two cores). It exits 1 for the files that are not
# Python 3.11 (some packages' test data), which pip skips as well: hence `|| true`.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --no-compile -c constraints.txt --no-deps --index-url $(TORCH_INDEX) torch torchvision
	$(PIP) install --no-compile -c constraints.txt -e ".[$(EXTRAS)]"
	$(BIN)/python -m compileall -q -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') > /dev/null || true
	$(PIP) check
	touch $(STAMP)

setup: $(STAMP)

# After a deliberate upgrade in the venv: rewrite constraints.txt from it (header kept, no
# local version labels, so the pins fit every TORCH_INDEX).
constraints: $(STAMP)
	{ grep '^#' constraints.txt; $(PIP) freeze --exclude-editable | sed -E 's/^(torch(vision)?==[^+]+)\+.*/\1/'; } \
		> constraints.txt.new
	mv constraints.txt.new constraints.txt

demo: $(STAMP)
	$(BIN)/split-demo --out $(OUT)

# The suite runs on every core (pytest-xdist), a test file at a time per worker so that its
# module-scoped servers start once, the slowest files first (SLOWEST_FIRST in tests/conftest.py;
# --no-loadscope-reorder keeps that order); the 15 slowest tests are listed at the end.
# `make test-fast`: the unit tier, no test marked slow. `make test-hosts`: the fault and flood tests across namespace hosts (root; .ci/run runs both).
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=15
# The project's own modules byte-compiled first: where PYTHONDONTWRITEBYTECODE is set (these
# machines set it) every one of the suite's ~150 processes would otherwise compile them anew.
COMPILE := $(BIN)/python -m compileall -q splitnet edge_client cloud_server cem attacks deploy

test: $(STAMP)
	$(COMPILE)
	$(PYTEST) -m "not hosts"

test-fast: $(STAMP)
	$(COMPILE)
	$(PYTEST) -m "not slow and not hosts"

test-hosts: $(STAMP)
	$(COMPILE)
	$(PYTEST) -m hosts

proto: $(STAMP)
	$(BIN)/python -m splitnet.protogen

bench: $(STAMP)
	$(BIN)/python benchmarks/transport.py

clean:
	rm -rf $(VENV) out
