"""dead letters: a key (a redelivered bad message is kept once), the whole payload's size and hash

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("dead_letters") as table:
        # Rows from before this revision have no key (NULLs never conflict).
        table.add_column(sa.Column("key", sa.String(40), nullable=True))
        table.add_column(sa.Column("payload_size", sa.BigInteger(), nullable=True))
        table.add_column(sa.Column("payload_sha256", sa.String(64), nullable=True))
        table.create_unique_constraint(op.f("uq_dead_letters_key"), ["key"])


def downgrade() -> None:
    with op.batch_alter_table("dead_letters") as table:
        table.drop_constraint(op.f("uq_dead_letters_key"), type_="unique")
        table.drop_column("payload_sha256")
        table.drop_column("payload_size")
        table.drop_column("key")
