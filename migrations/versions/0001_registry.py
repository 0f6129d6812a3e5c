"""device registry: devices, device_configs, device_alerts

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[sa.DateTime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("location", sa.String(200), nullable=True),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        _timestamp("last_seen_at", nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'inactive', 'maintenance')", name=op.f("ck_devices_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    for column in ("type", "status", "location", "last_seen_at"):
        op.create_index(op.f(f"ix_devices_{column}"), "devices", [column])

    op.create_table(
        "device_configs",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("value", JSON, nullable=False),
        _timestamp("updated_at"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_configs_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "key", name=op.f("pk_device_configs")),
    )

    op.create_table(
        "device_alerts",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("field", sa.String(64), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("rule_id", sa.Integer(), nullable=True),
        _timestamp("created_at"),
        _timestamp("acknowledged_at", nullable=True),
        _timestamp("resolved_at", nullable=True),
        sa.CheckConstraint(
            "severity IN ('info', 'warning', 'critical')", name=op.f("ck_device_alerts_severity")
        ),
        sa.CheckConstraint(
            "status IN ('active', 'acknowledged', 'resolved')",
            name=op.f("ck_device_alerts_status"),
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_alerts_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_alerts")),
    )
    op.create_index(op.f("ix_device_alerts_created_at"), "device_alerts", ["created_at"])
    for column in ("device_id", "status", "severity"):
        op.create_index(
            op.f(f"ix_device_alerts_{column}_created_at"),
            "device_alerts",
            [column, "created_at"],
        )


def downgrade() -> None:
    op.drop_table("device_alerts")
    op.drop_table("device_configs")
    op.drop_table("devices")
