"""The example schema's migrations: ``alembic upgrade head`` / ``downgrade base`` from the
repository root, on SQLite and PostgreSQL, and the migrated schema matches the models.

Each PostgreSQL run migrates into its own schema (``search_path`` in the URL), dropped at
teardown, so runs never collide.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from support.repo import REPO_ROOT


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'workers.db'}"
        return
    base = request.getfixturevalue("postgres_url")
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


def alembic(database_url: str, *args: str) -> None:
    env = {**os.environ, "DATABASE_URL": database_url}
    env.pop("REDIS_URL", None)  # migrating must not need (or start) Redis
    done = subprocess.run([sys.executable, "-m", "alembic", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"alembic {' '.join(args)} failed:\n{done.stderr}"


def test_upgrade_matches_the_models_and_downgrade_removes_the_schema(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from workers.models import Base

    alembic(database_url, "upgrade", "head")
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert {"users", "cards"} <= set(inspect(conn).get_table_names())
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert context.get_current_revision() is not None
        alembic(database_url, "downgrade", "base")
        with engine.connect() as conn:
            assert not {"users", "cards"} & set(inspect(conn).get_table_names())
            assert MigrationContext.configure(conn).get_current_revision() is None
    finally:
        engine.dispose()
