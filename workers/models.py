"""The example schema: a user profile and a card derived from it, both tracked.

``User.version`` is SQLAlchemy's ``version_id_col``: set to 1 on INSERT and incremented by every
UPDATE the ORM emits, guarded by ``WHERE version = <old>`` (a concurrent update raises
``StaleDataError`` instead of being lost). The demo's staleness check compares versions.

This module must never import a cache or open a connection: models are imported by every process
(web, worker, alembic) before any of them decides how it connects.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, ForeignKey, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from hybridinval.sqlalchemy import outbox_table, track

__all__ = ["Base", "Card", "User", "card_key", "outbox", "user_key"]


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    # Named constraints, so that migrations can drop them by name on every database.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


# The transactional outbox (install(..., outbox=True)): in the models' metadata, so that
# Alembic's autogenerate and create_all see it.
outbox = outbox_table(Base.metadata)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(200), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    bio: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=_now, onupdate=_now
    )

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012 - SQLAlchemy's own protocol

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "email": self.email,
            "name": self.name,
            "bio": self.bio,
            "version": self.version,
        }


class Card(Base):
    """What a profile page shows, rebuilt by the ``refresh_card`` task after each user change."""

    __tablename__ = "cards"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    headline: Mapped[str] = mapped_column(String(400))
    user_version: Mapped[int] = mapped_column(Integer)
    refreshed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    def to_dict(self) -> dict[str, object]:
        return {
            "user_id": self.user_id,
            "headline": self.headline,
            "user_version": self.user_version,
        }


def user_key(user_id: int) -> str:
    return f"user:{user_id}"


def card_key(user_id: int) -> str:
    return f"card:{user_id}"


track(User, keys=["user:{id}"])
track(Card, keys=["card:{user_id}"])
