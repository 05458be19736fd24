# Developer and CI entry points. `make test` is what CI runs (via .ci/run).
# Every target uses the project's own .venv so results do not depend on
# whatever happens to be installed globally.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamp: reinstall (and rebuild the C hit path) when the build inputs change, not on every run.
STAMP := $(VENV)/.installed

.PHONY: venv lint typecheck test bench demo

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py hybridinval/_speedups.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check hybridinval tests benchmarks workers alembic

typecheck: venv
	$(BIN)/mypy

# No pipes or `|| true` after pytest: its non-zero exit (including 5, "no
# tests collected") must fail make, and therefore CI.
test: venv lint typecheck
	$(BIN)/pytest -q

bench: venv
	$(BIN)/python -m benchmarks

demo: venv
	$(BIN)/hybridinval demo
