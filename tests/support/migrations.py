"""PostgreSQL schemas of one's own, and the repository's alembic, for the deployment tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from .repo import REPO_ROOT


@contextlib.contextmanager
def private_schema(base_url: str, prefix: str) -> Iterator[str]:
    """A URL on ``base_url``'s database whose ``search_path`` is a fresh schema, dropped (with
    everything in it) when the block ends, so concurrent runs never collide."""
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base_url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        try:
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


def alembic(database_url: str, *args: str) -> None:
    """Run ``alembic *args`` from the repository root against ``database_url``."""
    env = {**os.environ, "HYBRIDINVAL_DATABASE_URL": database_url}
    env.pop("HYBRIDINVAL_REDIS_URL", None)  # migrating must not need (or start) Redis
    done = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"alembic {' '.join(args)} failed:\n{done.stderr}"
