# Developer and CI entry points. `make test` is what CI runs (via .ci/run).
# Every target uses the project's own .venv so results do not depend on
# whatever happens to be installed globally.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamp: reinstall (and rebuild the C hit path) when the build inputs change, not on every run.
STAMP := $(VENV)/.installed

.PHONY: venv lint typecheck test test-fast bench chaos fanout demo FORCE

venv: $(STAMP)

# On every run: the venv's Python must run and be one that requires-python admits, else the venv
# is made again with $(PYTHON), or make stops with the problem and the fix. <venv>/.python (which
# Python it is) changes only when the venv was (re)made or its Python changed, and the install
# stamp follows it. (`make -n` does not run the check, so it always lists the install.)
$(VENV)/.python: FORCE
	@sh .ci/ensure-venv $(VENV) '$(PYTHON)'

FORCE:

$(STAMP): $(VENV)/.python pyproject.toml setup.py hybridinval/_speedups.c hybridinval/_version.py
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check hybridinval tests benchmarks workers alembic upstream
	$(BIN)/ruff format --check hybridinval tests benchmarks workers alembic upstream

typecheck: venv
	$(BIN)/mypy

# No pipes or `|| true` after pytest: its non-zero exit (including 5, "no
# tests collected") must fail make, and therefore CI.
test: venv lint typecheck
	$(BIN)/pytest -q

# Everything but the tests marked slow (real workers, gunicorn, the soak, the demo, the
# benchmark harness): for the edit-test loop. CI runs `make test`.
test-fast: venv lint typecheck
	$(BIN)/pytest -q -m "not slow"

bench: venv
	$(BIN)/python -m benchmarks

# The mixed workload under real faults (Redis killed, subscribers cut, half-open links, writers
# SIGKILLed mid-commit, ...): a few minutes; results in benchmarks/results/chaos.{json,md}. Needs
# redis-server and PostgreSQL; half-open links need root (iptables) and are skipped otherwise.
chaos: venv
	$(BIN)/python -m benchmarks.chaos

# One invalidation to 8, 32 and 128 subscriber processes, on Redis Pub/Sub and RabbitMQ, against
# the raw clients: propagation to the slowest process, Redis CPU per message, keys/s with 1 and 4
# writers; results in benchmarks/results/fanout.{json,md,png}. A few minutes.
fanout: venv
	$(BIN)/python -m benchmarks.fanout --amqp --cluster

demo: venv
	$(BIN)/hybridinval demo

# Everything CI runs (.ci/run, with make -k): make test, SQLAlchemy's own ORM and extension tests
# with hybridinval installed on SQLAlchemy 2.1 and 2.0 (SQLite and PostgreSQL), Flask-SQLAlchemy's
# suite, and our SQLAlchemy tests on SQLAlchemy 2.0. About 30 minutes on two cores.
check: test test-sqlalchemy test-sqlalchemy-sa20 test-flask-sqlalchemy test-sa20

# -- Upstream suites (upstream/): SQLAlchemy's and Flask-SQLAlchemy's own tests, run plain and
# with hybridinval installed; fails on any test that passes plain but not installed, unless it
# passes once hybridinval's own reads are hidden from the engine's listeners (it then differed
# only by the statements it saw) or is listed in upstream/allowed.txt. Slow, so not part of
# `make test`. Both databases always run; the worst exit status wins. Regression lists:
# /tmp/upstream_regressions_<db>.txt.
.PHONY: upstream-deps test-sqlalchemy test-flask-sqlalchemy venv-sa20 test-sqlalchemy-sa20 \
	test-sa20 check

UPSTREAM_DEPS := $(VENV)/.upstream-deps
VENV_SA20 := .venv-sa20

upstream-deps: $(UPSTREAM_DEPS)

$(UPSTREAM_DEPS): $(STAMP) upstream/requirements.txt upstream/requirements-flask.txt
	$(BIN)/python -m pip install -r upstream/requirements-flask.txt
	touch $@

test-sqlalchemy: $(UPSTREAM_DEPS)
	rc=0; for db in sqlite postgresql; do \
	  $(BIN)/python -m upstream.sqlalchemy_suite --db $$db; s=$$?; [ $$s -gt $$rc ] && rc=$$s; \
	done; exit $$rc

# On SQLAlchemy 2.1 a third of Flask-SQLAlchemy 3.1.1's own tests fail even without hybridinval
# (its dataclass bases), so it runs on SQLAlchemy 2.0 as well, where they pass.
test-flask-sqlalchemy: $(UPSTREAM_DEPS) $(VENV_SA20)/.upstream-deps
	rc=0; for venv in $(VENV) $(VENV_SA20); do \
	  $(BIN)/python -m upstream.flask_sqlalchemy_suite --venv $$venv; s=$$?; \
	  [ $$s -gt $$rc ] && rc=$$s; \
	done; exit $$rc

$(VENV_SA20)/.upstream-deps: $(VENV_SA20)/.installed upstream/requirements-flask.txt
	$(VENV_SA20)/bin/python -m pip install -r upstream/requirements-flask.txt
	touch $@

# SQLAlchemy 2.0 (the oldest series hybridinval supports) in a venv of its own. Not an editable
# install: that would rebuild hybridinval/_speedups*.so in the source tree, under .venv's feet.
# The suites import hybridinval from the source tree anyway (PYTHONPATH), so this copy only
# proves that the package installs and imports next to SQLAlchemy 2.0.
venv-sa20: $(VENV_SA20)/.installed

$(VENV_SA20)/.python: FORCE
	@sh .ci/ensure-venv $(VENV_SA20) '$(PYTHON)'

$(VENV_SA20)/.installed: $(VENV_SA20)/.python pyproject.toml setup.py hybridinval/_speedups.c \
  hybridinval/_version.py upstream/requirements.txt
	$(VENV_SA20)/bin/python -m pip install --upgrade pip
	$(VENV_SA20)/bin/python -m pip install '.[test]' 'sqlalchemy==2.0.58' \
	  -r upstream/requirements.txt
	cd /tmp && $(CURDIR)/$(VENV_SA20)/bin/python -c \
	  'import sqlalchemy, hybridinval.sqlalchemy as h; print(sqlalchemy.__version__, h.__file__)'
	touch $@

# Our own SQLAlchemy tests (and the README's examples) on SQLAlchemy 2.0, hybridinval from the
# source tree.
test-sa20: venv-sa20
	PYTHONPATH=$(CURDIR) $(VENV_SA20)/bin/pytest -q tests/integration_sqlalchemy tests/deployment/test_readme.py

test-sqlalchemy-sa20: venv-sa20 $(UPSTREAM_DEPS)
	rc=0; for db in sqlite postgresql; do \
	  $(BIN)/python -m upstream.sqlalchemy_suite --venv $(VENV_SA20) --db $$db; s=$$?; \
	  [ $$s -gt $$rc ] && rc=$$s; \
	done; exit $$rc
