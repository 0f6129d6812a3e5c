"""data lifecycle: the time series partitioned by day on PostgreSQL; 1-minute and 1-hour rollups

On PostgreSQL `telemetry` becomes a table partitioned by range of `epoch_us`: the table as it
was is attached, unchanged and without a copy, as `telemetry_history` for every time before
the first whole day after its newest row (an empty table: a week before today); the app
creates the hourly partitions after it (`iotmeter.storage.timeseries.partitions`), and
compacts closed hours into `telemetry_compact`. The rollup and compacted tables are
partitioned by day the same way.
A BRIN index on the time finds a window's rows for the rollups and for retention (a few pages
per partition; the primary key starts with the device). SQLite keeps plain tables with a
B-tree index on the time.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DAY_US = 86_400_000_000
ROLLUPS = ("telemetry_rollup_1m", "telemetry_rollup_1h")


def _rollup_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("field", sa.String(64), nullable=False),
        sa.Column("bucket_us", sa.BigInteger(), nullable=False),
        sa.Column("min_value", sa.Float(), nullable=False),
        sa.Column("max_value", sa.Float(), nullable=False),
        sa.Column("sum_value", sa.Float(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("first_value", sa.Float(), nullable=False),
        sa.Column("last_value", sa.Float(), nullable=False),
    ]


def _pg_partitioned_rollup(name: str, first_day_us: int) -> None:
    columns = ", ".join(
        f"{column} {kind} NOT NULL"
        for column, kind in (
            ("device_id", "VARCHAR(64)"),
            ("field", "VARCHAR(64)"),
            ("bucket_us", "BIGINT"),
            ("min_value", "FLOAT8"),
            ("max_value", "FLOAT8"),
            ("sum_value", "FLOAT8"),
            ("count", "BIGINT"),
            ("first_value", "FLOAT8"),
            ("last_value", "FLOAT8"),
        )
    )
    op.execute(
        f"CREATE TABLE {name} ({columns}, CONSTRAINT pk_{name} PRIMARY KEY "
        "(device_id, field, bucket_us)) PARTITION BY RANGE (bucket_us)"
    )
    op.execute(
        f"CREATE TABLE {name}_history PARTITION OF {name} "
        f"FOR VALUES FROM (MINVALUE) TO ({first_day_us})"
    )
    op.execute(f"CREATE INDEX ix_{name}_bucket_us ON {name} USING brin (bucket_us)")


def upgrade() -> None:
    op.create_table(
        "telemetry_rollup_state",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("done_until_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_telemetry_rollup_state")),
    )
    op.create_table(
        "telemetry_rollup_dirty",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("field", sa.String(64), nullable=False),
        sa.Column("bucket_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "device_id", "field", "bucket_us", name=op.f("pk_telemetry_rollup_dirty")
        ),
    )
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(op.f("ix_telemetry_epoch_us"), "telemetry", ["epoch_us"])
        # Compaction is PostgreSQL's (arrays, TOAST); the table exists everywhere, unused.
        op.create_table(
            "telemetry_compact",
            sa.Column("device_id", sa.String(64), nullable=False),
            sa.Column("field", sa.String(64), nullable=False),
            sa.Column("hour_us", sa.BigInteger(), nullable=False),
            sa.Column("offsets_us", sa.JSON(), nullable=False),
            sa.Column("point_values", sa.JSON(), nullable=False),
            sa.PrimaryKeyConstraint(
                "device_id", "field", "hour_us", name=op.f("pk_telemetry_compact")
            ),
        )
        op.create_index(op.f("ix_telemetry_compact_hour_us"), "telemetry_compact", ["hour_us"])
        for name in ROLLUPS:
            op.create_table(
                name,
                *_rollup_columns(),
                sa.PrimaryKeyConstraint("device_id", "field", "bucket_us", name=op.f(f"pk_{name}")),
            )
            op.create_index(op.f(f"ix_{name}_bucket_us"), name, ["bucket_us"])
        return
    # Where the app's partitions start. An existing table becomes the history partition
    # as it is, so they start after its newest row and today. An empty one: a week back, so
    # that readings of the last days written later (an import, a replay) are partitioned by
    # hour and compacted like live ones; older ones go to the history partition.
    bind = op.get_bind()
    newest = bind.execute(sa.text("SELECT max(epoch_us) FROM telemetry")).scalar()
    now_us = bind.execute(
        sa.text("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
    ).scalar_one()
    if newest is None:
        first_day_us = (now_us // DAY_US - 7) * DAY_US
    else:
        first_day_us = (max(now_us, newest) // DAY_US + 1) * DAY_US
    op.execute("ALTER TABLE telemetry RENAME TO telemetry_history")
    op.execute(
        "ALTER TABLE telemetry_history RENAME CONSTRAINT pk_telemetry TO pk_telemetry_history"
    )
    op.execute(
        "CREATE TABLE telemetry (device_id VARCHAR(64) NOT NULL, field VARCHAR(64) NOT NULL, "
        "epoch_us BIGINT NOT NULL, value FLOAT8 NOT NULL, "
        "CONSTRAINT pk_telemetry PRIMARY KEY (device_id, field, epoch_us)) "
        "PARTITION BY RANGE (epoch_us)"
    )
    # Attaching scans the old table once to check the bound; no row is copied.
    op.execute(
        "ALTER TABLE telemetry ATTACH PARTITION telemetry_history "
        f"FOR VALUES FROM (MINVALUE) TO ({first_day_us})"
    )
    op.execute("CREATE INDEX ix_telemetry_epoch_us ON telemetry USING brin (epoch_us)")
    # Closed hours of raw points as one row per series and hour: the times (microseconds
    # after the hour) and the values as arrays, which TOAST compresses.
    op.execute(
        "CREATE TABLE telemetry_compact (device_id VARCHAR(64) NOT NULL, "
        "field VARCHAR(64) NOT NULL, hour_us BIGINT NOT NULL, offsets_us BIGINT[] NOT NULL, "
        "point_values FLOAT8[] NOT NULL, CONSTRAINT pk_telemetry_compact PRIMARY KEY "
        "(device_id, field, hour_us)) PARTITION BY RANGE (hour_us)"
    )
    op.execute(
        "CREATE TABLE telemetry_compact_history PARTITION OF telemetry_compact "
        f"FOR VALUES FROM (MINVALUE) TO ({first_day_us})"
    )
    op.execute("CREATE INDEX ix_telemetry_compact_hour_us ON telemetry_compact (hour_us)")
    for name in ROLLUPS:
        _pg_partitioned_rollup(name, first_day_us)


def downgrade() -> None:
    for name in ROLLUPS:
        op.drop_table(name)
    if op.get_bind().dialect.name == "postgresql":
        # The compacted hours go back to rows first.
        op.execute(
            "INSERT INTO telemetry (device_id, field, epoch_us, value) SELECT c.device_id, "
            "c.field, c.hour_us + point.offset_us, point.value FROM telemetry_compact c "
            "CROSS JOIN LATERAL unnest(c.offsets_us, c.point_values) AS point(offset_us, value) "
            "ON CONFLICT DO NOTHING"
        )
    op.drop_table("telemetry_compact")
    if op.get_bind().dialect.name != "postgresql":
        op.drop_index(op.f("ix_telemetry_epoch_us"), "telemetry")
    else:
        # Back to one plain table: every partition's rows are copied into it.
        op.execute("ALTER TABLE telemetry RENAME TO telemetry_partitioned")
        op.execute(
            "ALTER TABLE telemetry_partitioned RENAME CONSTRAINT pk_telemetry "
            "TO pk_telemetry_partitioned"
        )
        op.execute(
            "CREATE TABLE telemetry (device_id VARCHAR(64) NOT NULL, field VARCHAR(64) NOT NULL, "
            "epoch_us BIGINT NOT NULL, value FLOAT8 NOT NULL, "
            "CONSTRAINT pk_telemetry PRIMARY KEY (device_id, field, epoch_us))"
        )
        op.execute(
            "INSERT INTO telemetry SELECT device_id, field, epoch_us, value "
            "FROM telemetry_partitioned"
        )
        op.execute("DROP TABLE telemetry_partitioned CASCADE")
    op.drop_table("telemetry_rollup_dirty")
    op.drop_table("telemetry_rollup_state")
