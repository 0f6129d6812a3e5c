"""device_series: the fields each device has sent, for the limit on new series per hour;
on PostgreSQL, a notification when an API key changes (the key caches of every process)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "device_series",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("field", sa.String(64), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "field", name=op.f("pk_device_series")),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Any change that can make a key unusable, by any path (API, CLI, plain SQL), notifies
        # the processes caching keys; PostgreSQL delivers it when the transaction commits.
        op.execute(
            "CREATE FUNCTION iotmeter_api_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN PERFORM pg_notify('iotmeter_api_keys', OLD.key_id); RETURN NULL; END $$"
        )
        op.execute(
            "CREATE TRIGGER api_key_changed "
            "AFTER UPDATE OF key_id, secret_hash, role, expires_at, revoked_at OR DELETE "
            "ON api_keys FOR EACH ROW EXECUTE FUNCTION iotmeter_api_key_changed()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER api_key_changed ON api_keys")
        op.execute("DROP FUNCTION iotmeter_api_key_changed()")
    op.drop_table("device_series")
