"""Run SQLAlchemy's own ORM tests (test/orm, test/ext) plain and with hybridinval installed.

    python -m upstream.sqlalchemy_suite --db sqlite|postgresql [--mode both|plain|installed]
        [--venv .venv-sa20] [--reuse-plain] [pytest args, e.g. -k test_bulk]

The tests come from the sdist of the SQLAlchemy version installed in the venv and run under
SQLAlchemy's own pytest plugin (test/conftest.py), two pytest-xdist workers by default.
``PYTHONNOUSERSITE=1`` (``python -s``, but inherited by the xdist workers, which a ``-s`` flag
is not) makes test/conftest.py leave the sdist's ``lib/`` off ``sys.path``: the tests exercise
the installed SQLAlchemy, compiled extensions included, the one hybridinval runs against.
On PostgreSQL (``HYBRIDINVAL_UPSTREAM_PG_URL``) a dedicated template database is created with
the schemas and extensions SQLAlchemy's README.unittests.rst asks for; each xdist worker gets a
copy of it (``CREATE DATABASE test_<random> TEMPLATE ...``), dropped at the end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psycopg
from psycopg import sql

from ._suite import Suite, main

PG_URL = os.environ.get(
    "HYBRIDINVAL_UPSTREAM_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/sa_upstream"
)


def db_args(db: str, source: Path) -> list[str]:
    if db == "sqlite":
        return ["--dburi", "sqlite:///:memory:"]
    prepare_postgresql(PG_URL)
    return ["--dburi", PG_URL]


def prepare_postgresql(url: str) -> None:
    """Create the template database (if missing) with test_schema, test_schema_2, hstore and
    citext. It must stay empty: xdist workers get CREATE DATABASE ... TEMPLATE copies of it."""
    base, _, name = url.replace("+psycopg", "").rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(
                sql.SQL("CREATE DATABASE {} ENCODING 'utf8' TEMPLATE template0").format(
                    sql.Identifier(name)
                )
            )
        prepared = conn.execute("SHOW max_prepared_transactions").fetchone()
        if prepared and prepared[0] == "0":
            print("note: max_prepared_transactions = 0, two-phase tests are skipped")
    with psycopg.connect(f"{base}/{name}", autocommit=True) as conn:
        for schema in ("test_schema", "test_schema_2"):
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        for extension in ("hstore", "citext"):
            conn.execute(
                sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(extension))
            )
        conn.execute(
            sql.SQL(
                "ALTER DATABASE {} SET default_text_search_config = 'pg_catalog.english'"
            ).format(sql.Identifier(name))
        )


SUITE = Suite(
    dist="sqlalchemy",
    test_paths=("test/orm", "test/ext"),
    plugin="upstream.hybridinval_plugin",
    dbs=("sqlite", "postgresql"),
    db_args=db_args,
    env=(("PYTHONNOUSERSITE", "1"),),
    # setup.cfg's addopts stop at 250 failures and print every test name; neither helps here.
    pytest_args=("-n", "2", "--maxfail=0", "-q", "--tb=native"),
    quiet_env="HYBRIDINVAL_UPSTREAM_QUIET_READS",
)

if __name__ == "__main__":
    sys.exit(main(SUITE))
