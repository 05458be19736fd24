"""Mapped classes for the SQLAlchemy unit-of-work tests, tracked at import.

Importable by child processes (spawn), so models, templates and the database helpers the
children need live here rather than in a test module. Table names are prefixed ``hi_`` and every
PostgreSQL test gets its own schema (``schema_translate_map``), so tests never share rows.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, ForeignKey, Integer, String, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from hybridinval.sqlalchemy import outbox_table, track


class Base(DeclarativeBase):
    pass


# In every test database (created with the test tables), for install(..., outbox=True).
OUTBOX = outbox_table(Base.metadata)


class Team(Base):
    """Not tracked: writes to it must publish nothing."""

    __tablename__ = "hi_teams"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class User(Base):
    __tablename__ = "hi_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(50), default="")
    addresses: Mapped[list[Address]] = relationship(
        back_populates="user", cascade="all, delete-orphan", order_by="Address.id"
    )


class Address(Base):
    __tablename__ = "hi_addresses"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("hi_users.id"))
    street: Mapped[str] = mapped_column(String(100), default="")
    user: Mapped[User] = relationship(back_populates="addresses")


class Membership(Base):
    """A foreign key checked only at COMMIT: IntegrityError from commit(), not from flush()."""

    __tablename__ = "hi_memberships"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("hi_users.id", deferrable=True, initially="DEFERRED")
    )


class Item(Base):
    """The soak test's rows: explicit ids, one string value."""

    __tablename__ = "hi_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[str] = mapped_column(String(100))


track(User, keys=["user:{id}", "user_by_email:{email}"])
track(Address, keys=["address:{id}", "user_addresses:{user_id}"])
track(Membership, keys=["membership:{id}"])
track(Item, keys=["item:{id}"])


@dataclass
class DbSpec:
    """Everything a process needs to reach one test's database (picklable, for spawn)."""

    kind: str  # "sqlite" or "postgresql"
    url: str
    schema: str | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)

    def engine(self, **options: Any) -> Engine:
        """A new engine on this test's database (``options`` override, e.g. isolation_level)."""
        opts = {**self.engine_options, **options}
        if self.kind == "sqlite":
            opts.setdefault("connect_args", {"timeout": 30})
        engine = create_engine(self.url, **opts)
        if self.kind == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        if self.schema is not None:
            engine = engine.execution_options(schema_translate_map={None: self.schema})
        return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_database(kind: str, base_url: str) -> DbSpec:
    """Create the tables in a fresh SQLite file (``base_url`` is its path) or PG schema."""
    if kind == "sqlite":
        spec = DbSpec("sqlite", f"sqlite:///{base_url}")
        engine = spec.engine()
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")  # readers do not block the writer
    else:
        schema = f"hi_{uuid.uuid4().hex[:12]}"
        admin = create_engine(base_url)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
        spec = DbSpec("postgresql", base_url, schema)
        engine = spec.engine()
    Base.metadata.create_all(engine)
    engine.dispose()
    return spec


def drop_database(spec: DbSpec) -> None:
    if spec.schema is not None:
        admin = create_engine(spec.url)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{spec.schema}" CASCADE'))
        admin.dispose()


class TrackedSession(Session):
    """A Session subclass per test run family, so installs never cover sessions of other code."""
