"""ingestion: SQL time-series store (telemetry, telemetry_latest) and dead letters

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "telemetry",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("field", sa.String(64), nullable=False),
        sa.Column("epoch_us", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "field", "epoch_us", name=op.f("pk_telemetry")),
    )
    op.create_table(
        "telemetry_latest",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("field", sa.String(64), nullable=False),
        sa.Column("epoch_us", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "field", name=op.f("pk_telemetry_latest")),
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("device_id", sa.String(256), nullable=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_index(op.f("ix_dead_letters_received_at"), "dead_letters", ["received_at"])
    for column in ("reason", "device_id"):
        op.create_index(
            op.f(f"ix_dead_letters_{column}_received_at"), "dead_letters", [column, "received_at"]
        )


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_table("telemetry_latest")
    op.drop_table("telemetry")
