"""Arbitrary bytes, hostile JSON and odd topics through the whole pipeline: a real Mosquitto,
the app in its own process (intake, spool, every sink), on the embedded stores and on
PostgreSQL + SeaweedFS. After every generated round, every message must have been taken and
every sink must have drained the spool: nothing a device sends may stop ingestion."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_ingest_e2e import publish
from tests.fixtures.delivery import AppProcess, app_environment
from tests.fixtures.hostile import as_payload, json_texts, timed_batches, topic_levels
from tests.fixtures.s3 import s3_settings
from tests.fixtures.services import (
    Mosquitto,
    SeaweedFS,
    create_pg_database,
    drop_pg_database,
    running_mosquitto,
    running_seaweedfs,
)

MAX_PAYLOAD = 8192  # small, so that oversized payloads are cheap to make
RECORD_START = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
ROUNDS = int(os.environ.get("IOTMETER_TEST_HOSTILE_ROUNDS", "25"))
"""Generated rounds per backend (raise it for a longer search)."""


@dataclass
class Pipeline:
    app: AppProcess
    broker: Mosquitto
    api: httpx.AsyncClient


@pytest.fixture(scope="module")
def broker() -> Iterator[Mosquitto]:
    with running_mosquitto() as mosquitto:
        yield mosquitto


@pytest.fixture(scope="module")
def weed() -> Iterator[SeaweedFS]:
    with running_seaweedfs() as server:
        yield server


@pytest.fixture(scope="module", params=["embedded", "postgresql-s3"])
async def pipeline(
    request: pytest.FixtureRequest,
    broker: Mosquitto,
    weed: SeaweedFS,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Pipeline]:
    workdir = tmp_path_factory.mktemp(f"hostile-{request.param}")
    database_url = f"sqlite+aiosqlite:///{workdir}/iotmeter.db"
    s3 = None
    if request.param == "postgresql-s3":
        database_url = await create_pg_database("iotmeter_hostile")
        s3 = s3_settings(weed)
    env = app_environment(
        database_url=database_url,
        mqtt_url=broker.url,
        workdir=workdir,
        client_id=f"hostile-{request.param}",
        s3=s3,
        IOTMETER_MAX_PAYLOAD_BYTES=str(MAX_PAYLOAD),
        IOTMETER_BATCH_MAX_DELAY_S="0.05",
        # The lifecycle task (partitions made on demand for hostile times, rollups, late
        # marks, compaction) works on what the hostile rounds stored while they run.
        IOTMETER_LIFECYCLE_INTERVAL_S="0.5",
        IOTMETER_ARCHIVE_LAYOUT="segment" if s3 else "per-message",
        IOTMETER_ARCHIVE_SEGMENT_MAX_AGE_S="0.5",
    )
    app = AppProcess(env, workdir)
    await app.start("ready")
    try:
        async with httpx.AsyncClient(base_url=app.base_url, timeout=10, headers=app.headers) as api:
            yield Pipeline(app, broker, api)
        assert app.alive, f"the app died:\n{app.log_tail()}"
        log = app.log_path.read_text(errors="replace")
        assert "Traceback" not in log, log[-4000:]
    finally:
        await app.terminate()
        if request.param == "postgresql-s3":
            await drop_pg_database(database_url)


async def received(pipeline: Pipeline) -> int:
    count: int = (await pipeline.api.get("/api/v1/stats")).json()["messages"]["received"]
    return count


async def drained(pipeline: Pipeline, expected: int, within: float = 30.0) -> dict[str, object]:
    """Wait until the app took `expected` messages in all and every sink confirmed them."""
    deadline = time.monotonic() + within
    while True:
        stats = (await pipeline.api.get("/api/v1/stats")).json()
        spool = stats["spool"]
        if (
            stats["messages"]["received"] == expected
            and spool["depth"] == 0
            and not any(spool["lag_by_sink"].values())
        ):
            assert spool["failing_sinks"] == {}
            return dict(stats)
        assert pipeline.app.alive, pipeline.app.log_tail()
        assert time.monotonic() < deadline, f"the pipeline stopped moving: {stats}"
        await asyncio.sleep(0.05)


now_ms = int(time.time() * 1000)
payloads = st.one_of(
    st.binary(max_size=600),
    json_texts().map(as_payload),
    st.lists(json_texts(), min_size=2, max_size=6).map(
        lambda items: as_payload(f"[{','.join(items)}]")
    ),
    timed_batches(now_ms),
    st.integers(MAX_PAYLOAD + 1, 200_000).map(lambda size: b"[" + b"7," * (size // 2) + b"7]"),
)
messages = st.lists(
    st.tuples(topic_levels.map(lambda level: f"iot/{level}/telemetry"), payloads),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=ROUNDS,
    deadline=None,
    # Each example is a round trip through real processes: shrinking would take minutes, and
    # the failing round as generated says enough.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(round_=messages)
async def test_arbitrary_messages_never_stop_the_pipeline(
    pipeline: Pipeline, round_: list[tuple[str, bytes]]
) -> None:
    before = await received(pipeline)
    await asyncio.to_thread(publish, pipeline.broker.port, round_)
    await drained(pipeline, before + len(round_))


async def test_after_the_hostile_rounds_good_data_still_flows_and_nothing_was_an_internal_error(
    pipeline: Pipeline,
) -> None:
    good = [("iot/after-1/telemetry", b'{"metrics": {"t": 21.5}}')]
    before = await received(pipeline)
    await asyncio.to_thread(publish, pipeline.broker.port, good)
    stats = await drained(pipeline, before + 1)
    latest = await pipeline.api.get("/api/v1/devices/after-1/latest")
    assert latest.status_code == 200
    assert latest.json()["fields"]["t"]["value"] == 21.5
    reasons = stats["messages"]["rejected_by_reason"]  # type: ignore[index]
    assert "internal_error" not in reasons
    assert "sink_failed" not in reasons
    ready = await pipeline.api.get("/ready")
    assert ready.status_code == 200, ready.text
    # Windowed queries (rollups over whatever the rounds stored) still answer.
    windows = await pipeline.api.get(
        "/api/v1/devices/after-1/telemetry", params={"start": "-1h", "every": "1m"}
    )
    assert windows.status_code == 200, windows.text
    assert [series["field"] for series in windows.json()["series"]] == ["t"]
    # ...and the lifecycle task never gave up a round or died on what devices sent.
    log = pipeline.app.log_path.read_text(errors="replace")
    assert "lifecycle round skipped" not in log
    assert "background task lifecycle crashed" not in log
    # The metrics after every hostile round: readable by Prometheus' own parser, and telling
    # what /api/v1/stats tells (what devices sent never became a label).
    scrape = await pipeline.api.get("/metrics")
    assert scrape.status_code == 200, scrape.text
    families = {family.name: family for family in text_string_to_metric_families(scrape.text)}
    (received_total,) = families["iotmeter_messages_received"].samples
    assert received_total.value == stats["messages"]["received"]  # type: ignore[index]
    rejected = {
        sample.labels["reason"]: int(sample.value)
        for sample in families["iotmeter_messages_rejected"].samples
        if sample.value
    }
    assert rejected == reasons
    # The log: one line per record (a record's first line starts with its time; `=====` lines
    # are AppProcess's own start markers), so no topic or payload a device chose has started a
    # line of its own.
    log = pipeline.app.log_path.read_text(errors="replace")
    stray = [
        line
        for line in log.splitlines()
        if line and not line.startswith("===== ") and not RECORD_START.match(line)
    ]
    assert stray == [], stray[:5]
