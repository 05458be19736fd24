"""Run Flask-SQLAlchemy's own tests (its sdist's tests/) plain and with hybridinval installed on
every ``SQLAlchemy()`` extension object (:mod:`upstream.flask_plugin`).

    python -m upstream.flask_sqlalchemy_suite [--mode both|plain|installed] [pytest args]

Flask-SQLAlchemy must be installed in the venv (``make test-flask-sqlalchemy`` does it). Its
tests hard-code in-memory SQLite (``SQLALCHEMY_DATABASE_URI = "sqlite://"`` in their conftest),
so SQLite is the only database here.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ._suite import Suite, main


def db_args(db: str, source: Path) -> list[str]:
    return []


SUITE = Suite(
    dist="flask-sqlalchemy",
    test_paths=("tests",),
    plugin="upstream.flask_plugin",
    dbs=("sqlite",),
    db_args=db_args,
    pytest_args=("-q", "--tb=native"),
    label="flask_",
)

if __name__ == "__main__":
    sys.exit(main(SUITE))
