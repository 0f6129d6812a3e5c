"""alerting: rules and their state, one open alert per (rule, device), channels and the outbox

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
OPEN_RULE_ALERT = "rule_id IS NOT NULL AND status IN ('active', 'acknowledged')"


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[sa.DateTime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "alert_rules",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("device_type", sa.String(32), nullable=True),
        sa.Column("field", sa.String(64), nullable=True),
        sa.Column("operator", sa.String(8), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("low", sa.Float(), nullable=True),
        sa.Column("high", sa.Float(), nullable=True),
        sa.Column("hysteresis", sa.Float(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=True),
        sa.Column("k", sa.Float(), nullable=True),
        sa.Column("half_life", sa.Integer(), nullable=True),
        sa.Column("warmup", sa.Integer(), nullable=True),
        sa.Column("flap_window_s", sa.Float(), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.CheckConstraint(
            "kind IN ('threshold', 'rate_of_change', 'no_data', 'anomaly')",
            name=op.f("ck_alert_rules_kind"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_rules")),
    )
    op.create_table(
        "alert_rule_states",
        sa.Column("rule_id", sa.BigInteger(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("state", JSON, nullable=False),
        _timestamp("updated_at"),
        sa.ForeignKeyConstraint(
            ["rule_id"],
            ["alert_rules.id"],
            name=op.f("fk_alert_rule_states_rule_id_alert_rules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("rule_id", "device_id", name=op.f("pk_alert_rule_states")),
    )
    op.create_table(
        "notification_channels",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("secret", sa.String(200), nullable=True),
        sa.Column("topic", sa.String(256), nullable=True),
        sa.Column("email_to", JSON, nullable=True),
        sa.Column("min_severity", sa.String(16), nullable=False),
        sa.Column("rule_ids", JSON, nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        _timestamp("created_at"),
        sa.CheckConstraint(
            "kind IN ('webhook', 'mqtt', 'email')", name=op.f("ck_notification_channels_kind")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_channels")),
    )
    op.create_table(
        "notifications",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("channel_id", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("alert_id", sa.BigInteger(), nullable=True),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _timestamp("next_attempt_at"),
        sa.Column("last_error", sa.Text(), nullable=True),
        _timestamp("created_at"),
        _timestamp("delivered_at", nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed')",
            name=op.f("ck_notifications_status"),
        ),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["notification_channels.id"],
            name=op.f("fk_notifications_channel_id_notification_channels"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
    )
    op.create_index(
        op.f("ix_notifications_status_next_attempt_at"),
        "notifications",
        ["status", "next_attempt_at"],
    )
    op.create_index(
        op.f("ix_notifications_channel_id_created_at"),
        "notifications",
        ["channel_id", "created_at"],
    )
    op.create_table(
        "delivery_attempts",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("notification_id", sa.BigInteger(), nullable=False),
        _timestamp("at"),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("response", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["notification_id"],
            ["notifications.id"],
            name=op.f("fk_delivery_attempts_notification_id_notifications"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_attempts")),
    )
    op.create_index(
        op.f("ix_delivery_attempts_notification_id_at"),
        "delivery_attempts",
        ["notification_id", "at"],
    )
    with op.batch_alter_table("device_alerts") as table:
        table.add_column(_timestamp("first_breach_at", nullable=True))
        table.add_column(_timestamp("last_breach_at", nullable=True))
        table.add_column(sa.Column("extreme_value", sa.Float(), nullable=True))
        table.add_column(
            sa.Column("breach_count", sa.Integer(), nullable=False, server_default="0")
        )
        table.add_column(
            sa.Column("suppressed_count", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("device_alerts") as table:
        table.alter_column("breach_count", server_default=None)
        table.alter_column("suppressed_count", server_default=None)
    op.create_index(
        "uq_device_alerts_open_rule_device",
        "device_alerts",
        ["rule_id", "device_id"],
        unique=True,
        postgresql_where=sa.text(OPEN_RULE_ALERT),
        sqlite_where=sa.text(OPEN_RULE_ALERT),
    )


def downgrade() -> None:
    op.drop_index("uq_device_alerts_open_rule_device", table_name="device_alerts")
    with op.batch_alter_table("device_alerts") as table:
        for column in (
            "suppressed_count",
            "breach_count",
            "extreme_value",
            "last_breach_at",
            "first_breach_at",
        ):
            table.drop_column(column)
    op.drop_table("delivery_attempts")
    op.drop_table("notifications")
    op.drop_table("notification_channels")
    op.drop_table("alert_rule_states")
    op.drop_table("alert_rules")
