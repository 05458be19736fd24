"""Fixtures for the SQLAlchemy tests: a database per test on SQLite and on PostgreSQL, a cache,
an installed session factory and a spy on the publishes.

Test modules load them with ``pytest_plugins = ["support.sa_fixtures"]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from hybridinval import HybridCache
from hybridinval.sqlalchemy import Installation, install

from .sa_models import DbSpec, TrackedSession, create_database, drop_database
from .sa_spy import Publishes


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DbSpec]:
    """A fresh database with the test tables: a SQLite file (WAL) or a PostgreSQL schema."""
    if request.param == "sqlite":
        spec = create_database("sqlite", str(tmp_path / "test.db"))
    else:
        spec = create_database("postgresql", request.getfixturevalue("postgres_url"))
    try:
        yield spec
    finally:
        drop_database(spec)


@pytest.fixture
def engine(db: DbSpec) -> Iterator[Engine]:
    engine = db.engine()
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def cache(redis_url: str, namespace: str) -> Iterator[HybridCache]:
    cache = HybridCache.from_url(redis_url, namespace=namespace)
    assert cache.wait_until_subscribed(10)
    try:
        yield cache
    finally:
        cache.close()


@pytest.fixture
def publishes(cache: HybridCache) -> Publishes:
    return Publishes(cache)


@pytest.fixture
def installed(
    engine: Engine, cache: HybridCache
) -> Iterator[tuple[sessionmaker[Any], Installation]]:
    factory: sessionmaker[Any] = sessionmaker(engine, class_=TrackedSession)
    installation = install(factory, cache)
    try:
        yield factory, installation
    finally:
        installation.uninstall()


@pytest.fixture
def Sessions(installed: tuple[sessionmaker[Any], Installation]) -> sessionmaker[Any]:
    return installed[0]
