"""Alembic environment for the example deployment's schema (its ``models``).

The database is ``HYBRIDINVAL_DATABASE_URL`` (default ``sqlite:///workers.db``), unless a
caller that runs migrations programmatically passes a URL
(``config.set_main_option("sqlalchemy.url", ...)``) or an open connection
(``config.attributes["connection"]``).

The models come from the package named by the ``example_package`` option: ``workers`` in
``alembic.ini`` (the repository's deployment), ``hybridinval.demo.example`` when the demo runs
these same scripts from an installed wheel (it has no ``alembic.ini``).

This file must never start a cache or a Redis server: migrating needs only the database.
"""

from __future__ import annotations

import importlib
import logging
from logging.config import fileConfig

from sqlalchemy import Connection, create_engine, pool

from alembic import context

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

log = logging.getLogger("alembic.env")
example = config.get_main_option("example_package") or "workers"
target_metadata = importlib.import_module(f"{example}.models").Base.metadata
database_url = importlib.import_module(f"{example}.settings").database_url


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or database_url()


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: later migrations get copy-and-move batches.
        render_as_batch=connection.dialect.name == "sqlite",
    )


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
