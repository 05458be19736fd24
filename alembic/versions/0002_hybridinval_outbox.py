"""hybridinval outbox

The table ``install(..., outbox=True)`` writes each commit's keys to (``outbox_table()``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hybridinval_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("namespace", sa.String(length=200), nullable=False),
        sa.Column("keys", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_hybridinval_outbox"),
        sqlite_autoincrement=True,  # ids are never reused (a late delete by id stays exact)
    )


def downgrade() -> None:
    op.drop_table("hybridinval_outbox")
