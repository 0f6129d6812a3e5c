"""device channel: MQTT credentials and certificates of devices, desired and reported
configuration versions, connection status

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "device_credentials",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("broker_nonce", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_credentials_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_credentials")),
    )
    op.create_table(
        "device_certificates",
        sa.Column("serial", sa.String(40), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("fingerprint_sha256", sa.String(64), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_device_certificates")),
    )
    op.create_index(op.f("ix_device_certificates_device_id"), "device_certificates", ["device_id"])
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("connected", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("last_connected_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("last_disconnected_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(
            sa.Column("config_version", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("config_published_version", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("reported_config_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("reported_config", _JSON, nullable=True))
        batch.add_column(sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite it rebuilds `devices` (a DROP TABLE), which deletes every row
    # of the tables that reference it ON DELETE CASCADE (configs, alerts, credentials).
    # SQLite 3.35+ drops a plain column in place.
    for column in (
        "reported_at",
        "reported_config",
        "reported_config_version",
        "config_published_version",
        "config_version",
        "last_disconnected_at",
        "last_connected_at",
        "connected",
    ):
        op.drop_column("devices", column)
    op.drop_index(op.f("ix_device_certificates_device_id"), "device_certificates")
    op.drop_table("device_certificates")
    op.drop_table("device_credentials")
