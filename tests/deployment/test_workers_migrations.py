"""The example schema's migrations: ``alembic upgrade head`` / ``downgrade base`` from the
repository root, on SQLite and PostgreSQL, and the migrated schema matches the models.

Each PostgreSQL run migrates into its own schema (``search_path`` in the URL), dropped at
teardown, so runs never collide.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect
from support.migrations import alembic, private_schema


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'workers.db'}"
        return
    with private_schema(request.getfixturevalue("postgres_url"), "mig") as url:
        yield url


def test_upgrade_matches_the_models_and_downgrade_removes_the_schema(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from workers.models import Base

    alembic(database_url, "upgrade", "head")
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            assert {"users", "cards", "hybridinval_outbox"} <= tables
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert context.get_current_revision() is not None
        alembic(database_url, "downgrade", "0001")  # the outbox's own revision goes alone
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            assert "hybridinval_outbox" not in tables and {"users", "cards"} <= tables
        alembic(database_url, "upgrade", "head")
        alembic(database_url, "downgrade", "base")
        with engine.connect() as conn:
            assert not {"users", "cards", "hybridinval_outbox"} & set(
                inspect(conn).get_table_names()
            )
            assert MigrationContext.configure(conn).get_current_revision() is None
    finally:
        engine.dispose()
