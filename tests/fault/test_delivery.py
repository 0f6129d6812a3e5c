"""Delivery guarantees under faults (issue 4): what the broker acknowledged is stored, once.

Each test runs real processes: a ground-truth publisher process (QoS 1, it records every PUBACK),
the test's own Mosquitto, the app as `python -m iotmeter serve`, PostgreSQL and SeaweedFS. It
injects faults while messages flow, waits until the stores settle, then compares the record
with the stores (`tests/fixtures/delivery.py`). Each prints one `DELIVERY:` line with its counts
(run `pytest -s -m fault` to see them; they are also kept as JSON in the test's tmp folder and
in `$IOTMETER_TEST_FAULT_REPORT_DIR` when set). Every test has its own time budget and stops itself.

Set `IOTMETER_TEST_FAULT_SEED` to replay the random fault moments of an earlier run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from iotmeter.db.migrate import upgrade_async
from tests.fixtures.delivery import (
    AppProcess,
    ArchiveLocation,
    BrokerCounters,
    Deadline,
    DeliveryReport,
    GroundTruthPublisher,
    LocalArchive,
    PublisherConfig,
    PublisherRecord,
    S3Archive,
    app_environment,
    archive_key,
    check_delivery,
    plan_messages,
    wait_until_settled,
    write_report,
)
from tests.fixtures.postgres import running_private_postgres
from tests.fixtures.s3 import s3_settings
from tests.fixtures.services import Mosquitto, SeaweedFS, running_seaweedfs

pytestmark = pytest.mark.fault

TEST_BUDGET_S = 240.0
# Silence for this long means a loss is final. Longer than the app's longest retry backoff (30 s)
# and than an MQTT connection that dies silently takes to be noticed (keepalive 30 s: ~60 s).
QUIET_S = 75.0
CATCH_UP_LIMIT_S = 60.0
OUTAGE_S = 31.0


def fault_seed() -> int:
    configured = os.environ.get("IOTMETER_TEST_FAULT_SEED")
    return int(configured) if configured else random.randrange(2**31)


@dataclass
class Run:
    """One scenario's moving parts, closed together whatever happens."""

    app: AppProcess
    publisher: GroundTruthPublisher
    database_url: str
    archive: ArchiveLocation
    deadline: Deadline
    workdir: Path
    seed: int
    broker_counters: BrokerCounters | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    async def check(self) -> DeliveryReport:
        return await check_delivery(
            self.publisher.record(), database_url=self.database_url, archive=self.archive
        )

    async def finish(self, scenario: str) -> DeliveryReport:
        """Wait for the publisher's last PUBACK and for the stores to settle; report."""
        await self.publisher.join(max(1.0, self.deadline.remaining() - QUIET_S - 10))
        began = time.monotonic()
        report = await wait_until_settled(self.check, deadline=self.deadline, quiet_s=QUIET_S)
        self.extra["settle_s"] = round(time.monotonic() - began, 1)
        await self.app.stats()
        received = self.app.received_sampled
        self.extra["app_received_sampled"] = received
        self.extra["redeliveries_to_app_min"] = max(0, received - report.acknowledged)
        self.extra["longest_receive_stall_s"] = self.app.longest_receive_stall()
        summary = self.publisher.record().summary
        self.extra["publisher_reconnects"] = summary.get("disconnects")
        self.extra["publisher_unacked_at_disconnect"] = summary.get("unacked_at_disconnect")
        self.extra["publisher_resent_by_paho_acked"] = summary.get(
            "unacked_at_disconnect_acked_later"
        )
        self.extra["publisher_republished"] = summary.get("republished")
        if self.broker_counters is not None:
            await self.broker_counters.settle()
            counters = self.broker_counters.snapshot()
            self.extra |= counters
            sent = counters["broker_publish_sent"]
            if sent is not None and not counters["broker_restarts_seen"]:
                # PUBLISH packets the broker sent beyond one per message: redeliveries to the app.
                to_monitor = int(counters["sys_messages_to_monitor"] or 0)
                self.extra["broker_redeliveries"] = sent - to_monitor - report.acknowledged
        self.extra["seed"] = self.seed
        self.extra["seconds"] = round(self.deadline.elapsed(), 1)
        write_report(self.workdir, scenario, report, **self.extra)
        return report


@contextlib.asynccontextmanager
async def scenario(
    *,
    tmp_path: Path,
    broker: Mosquitto,
    database_url: str,
    s3: dict[str, Any],
    messages: int,
    rate_per_s: float,
    devices: int = 50,
    poison_share: float = 0.0,
    watch_broker: bool = True,
    app_settings: dict[str, str] | None = None,
) -> AsyncIterator[Run]:
    """Start the app (waits until its collector is subscribed) and the publisher's process."""
    deadline = Deadline(TEST_BUDGET_S)
    seed = fault_seed()
    print(f"\nfault seed {seed} (IOTMETER_TEST_FAULT_SEED={seed} replays it); files in {tmp_path}")
    env = app_environment(
        database_url=database_url,
        mqtt_url=broker.url,
        workdir=tmp_path,
        client_id=f"iotmeter-fault-{uuid.uuid4().hex[:8]}",
        s3=s3,
        **(app_settings or {}),
    )
    app = AppProcess(env, tmp_path / "app")
    publisher = GroundTruthPublisher(
        port=broker.port,
        workdir=tmp_path / "publisher",
        messages=messages,
        devices=devices,
        rate_per_s=rate_per_s,
        poison_share=poison_share,
        seed=seed,
    )
    counters = BrokerCounters(broker.port) if watch_broker else None
    run = Run(
        app=app,
        publisher=publisher,
        database_url=database_url,
        archive=S3Archive.from_settings(s3),
        deadline=deadline,
        workdir=tmp_path,
        seed=seed,
        broker_counters=counters,
    )
    sampler: asyncio.Task[None] | None = None
    try:
        # Subscribed before the first message: from then on the broker keeps the app's
        # persistent session and queues for it while the app is down.
        await app.start(wait="ready", within=min(60.0, deadline.remaining()))
        sampler = asyncio.create_task(app.sample_stats())
        publisher.start()
        await publisher.wait_connected()
        yield run
    finally:
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        publisher.close()
        if counters is not None:
            counters.close()
        if app.alive:
            await app.terminate(within=20)
        app.close()


def delivery_problems(run: Run, report: DeliveryReport) -> list[str]:
    """Everything that breaks the promise, with what to look at."""
    summary = run.publisher.record().summary
    problems = []
    if report.sent != run.publisher.config.messages:
        problems.append(f"publisher sent {report.sent} of {run.publisher.config.messages}")
    if report.acknowledged != report.sent:
        problems.append(
            f"the broker acknowledged {report.acknowledged} of {report.sent} sent messages "
            f"(publisher failures: {summary.get('failures')})"
        )
    if report.lost:
        problems.append(f"{report.lost_message()} (waiting ended: {report.settled_by})")
    if report.duplicates:
        problems.append(
            f"{report.duplicates} duplicate copies ({report.duplicates_timeseries} in the time "
            f"series, {report.duplicates_archive} in the archive)"
        )
    if report.unexpected:
        problems.append(
            f"{report.unexpected} rows/objects belong to no sent message "
            f"({report.unexpected_timeseries} time series, {report.unexpected_archive} archive)"
        )
    if report.incomplete_timeseries:
        problems.append(
            f"{report.incomplete_timeseries} messages have a wrong `value` or no `x` reading"
        )
    if report.archive_content_mismatches:
        problems.append(
            f"{report.archive_content_mismatches} of {report.archive_content_checked} sampled "
            "archive objects do not hold the bytes that were sent"
        )
    if report.poison_stored:
        problems.append(f"{report.poison_stored} poison messages were archived")
    if problems:
        problems.append(
            f"app log: {run.app.log_path}; publisher files: {run.publisher.config.workdir}"
        )
    return problems


@pytest.mark.parametrize("layout", ["per-message", "segment"])
async def test_app_sigkilled_at_random_moments_loses_nothing(
    tmp_path: Path, broker: Mosquitto, fresh_database: str, seaweedfs: SeaweedFS, layout: str
) -> None:
    """Scenario 1: SIGKILL the app ≥5 times while 20,000 messages flow: 0 lost, 0 duplicates
    (with either archive layout: the segment layout rebuilds segments after a crash)."""
    async with scenario(
        tmp_path=tmp_path,
        broker=broker,
        database_url=fresh_database,
        s3=s3_settings(seaweedfs),
        messages=20_000,
        rate_per_s=500,
        app_settings={"archive_layout": layout},
    ) as run:
        rng = random.Random(run.seed)
        messages = run.publisher.config.messages
        # Random moments (as counts of messages sent) in the first half: each restart takes
        # a few seconds of the run, and every kill must land while the publisher publishes.
        moments = sorted(int(rng.uniform(0.03, 0.55) * messages) for _ in range(6))
        kills: list[int] = []
        for moment in moments:
            await run.publisher.wait_sent(moment, within=run.deadline.remaining())
            if not run.publisher.publishing:
                break
            run.app.kill()
            kills.append(run.publisher.sent)
            await run.app.start(wait="health", within=min(60.0, run.deadline.remaining()))
            run.deadline.check("killing and restarting the app")
            # Mostly after the collector is back; sometimes while it still starts up.
            await asyncio.sleep(rng.uniform(0.0, 1.5))
        run.extra["kills"] = len(kills)
        run.extra["killed_after_sent"] = ",".join(map(str, kills))
        report = await run.finish(f"app_sigkill_{layout}")

    problems = delivery_problems(run, report)
    if len(kills) < 5:
        problems.insert(0, f"only {len(kills)} kills while the publisher was publishing (need 5)")
    assert not problems, "\n".join(problems)


async def test_broker_restarts_lose_nothing(
    tmp_path: Path, broker: Mosquitto, fresh_database: str, seaweedfs: SeaweedFS
) -> None:
    """Scenario 2: stop and start the test's Mosquitto (persistence on) 4 times: 0 lost."""
    async with scenario(
        tmp_path=tmp_path,
        broker=broker,
        database_url=fresh_database,
        s3=s3_settings(seaweedfs),
        messages=15_000,
        rate_per_s=500,
    ) as run:
        rng = random.Random(run.seed)
        restarts: list[float] = []
        while run.publisher.publishing and len(restarts) < 4:
            await asyncio.sleep(rng.uniform(1.5, 4.0))
            if not run.publisher.publishing:
                break
            # SIGTERM: Mosquitto writes its persistence file on the way out. (A SIGKILLed
            # broker loses what arrived since its last autosave: the broker's guarantee, not
            # iotmeter's.)
            await asyncio.to_thread(broker.stop)
            down = rng.uniform(1.0, 3.0)
            await asyncio.sleep(down)
            await asyncio.to_thread(broker.start)
            restarts.append(round(down, 1))
            run.deadline.check("restarting the broker")
        run.extra["broker_restarts"] = len(restarts)
        run.extra["broker_down_s"] = ",".join(map(str, restarts))
        report = await run.finish("broker_restart")

    problems = delivery_problems(run, report)
    if len(restarts) < 3:
        problems.insert(0, f"only {len(restarts)} broker restarts while publishing (need 3)")
    assert not problems, "\n".join(problems)


async def catch_up_time(run: Run, acknowledged: int, limit_s: float) -> float | None:
    """Seconds until the app's stats say `acknowledged` messages are in both stores."""
    began = time.monotonic()
    while time.monotonic() - began < min(limit_s, run.deadline.remaining()):
        stats = await run.app.stats()
        if stats is not None and stats["messages"]["stored"] >= acknowledged:
            return round(time.monotonic() - began, 1)
        await asyncio.sleep(0.25)
    return None


async def test_postgres_then_seaweedfs_outages_lose_nothing(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """Scenario 3: PostgreSQL, then SeaweedFS, down ≥30 s each while messages flow: 0 lost;
    the catch-up time after each recovery is printed."""
    with running_private_postgres() as postgres, running_seaweedfs() as weed:
        async with scenario(
            tmp_path=tmp_path,
            broker=broker,
            database_url=postgres.url,
            s3=s3_settings(weed),
            messages=36_000,
            rate_per_s=300,
        ) as run:
            await run.publisher.wait_sent(1_500, within=30)

            await asyncio.to_thread(postgres.stop)
            await asyncio.sleep(OUTAGE_S)
            await asyncio.to_thread(postgres.start)
            due = run.publisher.acknowledged
            catch_up_pg = await catch_up_time(run, due, CATCH_UP_LIMIT_S)
            print(f"\nPostgreSQL back after {OUTAGE_S:.0f} s: caught up in {catch_up_pg} s")
            run.deadline.check("waiting for the catch-up after PostgreSQL")
            stopped_weed_at_sent = run.publisher.sent

            await asyncio.to_thread(weed.stop)
            await asyncio.sleep(OUTAGE_S)
            await asyncio.to_thread(weed.start)
            due = run.publisher.acknowledged
            catch_up_s3 = await catch_up_time(run, due, CATCH_UP_LIMIT_S)
            print(f"SeaweedFS back after {OUTAGE_S:.0f} s: caught up in {catch_up_s3} s")
            run.extra |= {
                "outage_s": OUTAGE_S,
                "catch_up_postgres_s": catch_up_pg,
                "catch_up_seaweedfs_s": catch_up_s3,
                "seaweedfs_stopped_at_sent": stopped_weed_at_sent,
            }
            report = await run.finish("store_outages")

    problems = delivery_problems(run, report)
    if stopped_weed_at_sent >= run.publisher.config.messages:
        problems.insert(0, "the publisher had finished before SeaweedFS was stopped")
    assert not problems, "\n".join(problems)


async def test_poison_messages_land_in_dead_letters_exactly(
    tmp_path: Path, broker: Mosquitto, fresh_database: str, seaweedfs: SeaweedFS
) -> None:
    """Scenario 5: 1% poison messages: exactly those are dead letters; all others stored."""
    async with scenario(
        tmp_path=tmp_path,
        broker=broker,
        database_url=fresh_database,
        s3=s3_settings(seaweedfs),
        messages=10_000,
        rate_per_s=700,
        poison_share=0.01,
    ) as run:
        report = await run.finish("poison")

    problems = delivery_problems(run, report)
    if report.poison_sent == 0:
        problems.append("the plan held no poison message")
    if report.poison_dead_lettered != report.poison_sent:
        problems.append(
            f"{report.poison_dead_lettered} of {report.poison_sent} poison messages are dead "
            f"letters; missing: {', '.join(report.poison_missing_ids) or '-'}"
        )
    if report.dead_letter_duplicates:
        problems.append(f"{report.dead_letter_duplicates} poison messages dead-lettered twice")
    if report.dead_letters_unexpected:
        problems.append(f"{report.dead_letters_unexpected} dead letters are no poison message")
    if report.dead_letter_wrong_reason:
        problems.append(f"{report.dead_letter_wrong_reason} dead letters have the wrong reason")
    assert not problems, "\n".join(problems)


async def test_checker_counts_what_is_lost_duplicated_and_unexpected(
    tmp_path: Path, fresh_database: str
) -> None:
    """The checker itself can fail: planted losses, copies and strangers are all counted."""
    await upgrade_async(fresh_database)
    config = PublisherConfig(
        port=0,
        workdir=str(tmp_path),
        messages=60,
        devices=3,
        rate_per_s=1.0,
        base_ms=1_767_225_600_000,
        device_prefix="chk",
        client_id="checker",
        poison_share=0.1,
        seed=7,
    )
    plan = list(plan_messages(config))
    regular = [m for m in plan if m.poison_reason is None]
    poison = [m for m in plan if m.poison_reason is not None]
    assert len(poison) >= 3
    record = PublisherRecord(
        config=config,
        sent={m.msg_id: m for m in plan},
        acknowledged={m.msg_id for m in plan},
        summary={},
    )
    missing_in_timeseries = {regular[1].msg_id, regular[2].msg_id}
    wrong_value = regular[3]
    missing_in_archive = regular[4]
    # Archived as lines of one NDJSON segment of their device, one of them twice.
    in_segment = [m for m in regular[5:] if m.device == regular[5].device][:3]

    rows = []
    for message in regular:
        if message.msg_id in missing_in_timeseries:
            continue
        value = 999.0 if message is wrong_value else float(message.seq or 0)
        epoch_us = (message.ts_ms or 0) * 1000
        rows += [(message.device, "value", epoch_us, value), (message.device, "x", epoch_us, 1.5)]
    copy = regular[0]
    rows.append((copy.device, "value", (copy.ts_ms or 0) * 1000 + 500_000, float(copy.seq or 0)))
    rows.append(("stranger", "value", 1, 1.0))
    connection = await asyncpg.connect(fresh_database)
    try:
        await connection.executemany(
            "INSERT INTO telemetry (device_id, field, epoch_us, value) VALUES ($1, $2, $3, $4)",
            rows,
        )
        letters = [(m.topic, m.device, m.poison_reason, m.payload) for m in poison[1:]]
        letters.append(letters[0])  # one poison message dead-lettered twice
        letters.append(("iot/x/telemetry", "x", "not_json", b"not one of ours"))
        await connection.executemany(
            "INSERT INTO dead_letters (received_at, topic, device_id, reason, detail, payload) "
            "VALUES (now(), $1, $2, $3, 'planted', $4)",
            letters,
        )
    finally:
        await connection.close()

    root = tmp_path / "archive"
    for message in regular:
        if message is missing_in_archive or message in in_segment:
            continue
        path = root / archive_key(message.device, message.ts_ms or 0, message.msg_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b'{"topic":"t","payload":' + message.payload + b"}")
    moved = root / archive_key(copy.device, (copy.ts_ms or 0) + 500, copy.msg_id)
    moved.write_bytes(copy.payload)  # a second object for message 0, at another time
    (root / copy.device / "20260101T000000.000Z_m-nobody-1.json").write_bytes(b"{}")
    lines = [
        b'{"epoch_us":%d,"topic":"t","payload":%s}' % ((m.ts_ms or 0) * 1000, m.payload)
        for m in in_segment
    ]
    # The same message once more, at a wrong time: a copy, and a content mismatch.
    lines.append(b'{"epoch_us":1,"topic":"t","payload":%s}' % in_segment[0].payload)
    segment = root / in_segment[0].device / "20260101T000000.000Z_x_0123456789abcdef.ndjson.gz"
    segment.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))

    report = await check_delivery(
        record, database_url=fresh_database, archive=LocalArchive(root), sample_contents=50
    )
    assert (report.lost_timeseries, report.lost_archive, report.lost) == (2, 1, 3)
    assert set(report.lost_ids) == {*missing_in_timeseries, missing_in_archive.msg_id}
    assert report.incomplete_timeseries == 1
    assert (report.duplicates_timeseries, report.duplicates_archive) == (1, 2)
    assert (report.unexpected_timeseries, report.unexpected_archive) == (1, 1)
    assert report.archive_content_mismatches == 1
    assert report.poison_dead_lettered == len(poison) - 1
    assert report.poison_missing_ids == [poison[0].msg_id]
    assert (report.dead_letter_duplicates, report.dead_letters_unexpected) == (1, 1)
    assert not report.complete
