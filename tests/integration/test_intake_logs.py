"""What the intake tells an operator, against a real Mosquitto: the broker lost and back (naming
the broker), intake holds (once, however many holds), and the counters the metrics read."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from iotmeter.ingest import intake as intake_module
from iotmeter.ingest.broker import BrokerAddress
from iotmeter.ingest.intake import Intake
from iotmeter.ingest.spool import Spool
from iotmeter.ingest.stats import IngestStats
from tests.conftest import make_settings
from tests.fixtures.services import Mosquitto, running_mosquitto
from tests.fixtures.waiting import eventually

LOGGER = "iotmeter.ingest.intake"


class Lagging:
    """A sink that lags by more than the hold limit, and catches up as soon as it is held for."""

    def __init__(self, hold_limit: int) -> None:
        self.progress = asyncio.Event()
        self.hold_limit = hold_limit
        self.lagging = False

    def behind(self, head: int, limit: int) -> bool:
        return self.lagging and limit == self.hold_limit


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with running_mosquitto() as mosquitto:
        yield mosquitto


@pytest.fixture
async def intake(tmp_path: Path, broker: Mosquitto) -> AsyncIterator[tuple[Intake, Lagging]]:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/x.db", tmp_path, batch_max_messages=2)
    spool = Spool(tmp_path / "spool", ["only"])
    spool.open()
    flow = Lagging(hold_limit=4 * settings.batch_max_messages)
    intake = Intake(
        settings,
        BrokerAddress("127.0.0.1", broker.port),
        spool,
        client_id="log-intake",
        stats=IngestStats(),
        flow=flow,
    )
    task = asyncio.create_task(intake.run())
    try:
        await eventually(lambda: connected(intake), bool, what="intake subscribed")
        yield intake, flow
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        spool.close()


async def connected(intake: Intake) -> bool:
    return intake.connected


async def published(port: int, count: int) -> None:
    def publish() -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="log-publisher")
        client.connect("127.0.0.1", port)
        client.loop_start()
        try:
            infos = [client.publish("iot/d1/telemetry", b"{}", qos=1) for _ in range(count)]
            for info in infos:
                info.wait_for_publish(10)
        finally:
            client.loop_stop()
            client.disconnect()

    await asyncio.to_thread(publish)


async def test_the_broker_lost_and_back_is_logged_with_the_broker(
    intake: tuple[Intake, Lagging], broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    collector, _flow = intake
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert collector.reconnects == 0
    assert collector.inflight == 0

    await asyncio.to_thread(broker.stop)
    await eventually(lambda: connected(collector), lambda up: not up, what="connection lost")
    await asyncio.to_thread(broker.start)
    await eventually(lambda: connected(collector), bool, within=30, what="connection back")

    assert collector.reconnects == 1
    ours = [record for record in caplog.records if record.name == LOGGER]
    warnings = [record for record in ours if record.levelno == logging.WARNING]
    assert "failing, retrying until it works" in warnings[0].getMessage()
    assert "recovered after" in warnings[-1].getMessage()
    address = f"127.0.0.1:{broker.port}"
    assert {getattr(record, "broker", None) for record in warnings} == {address}
    subscribed = [record for record in ours if "subscribed" in record.getMessage()]
    assert getattr(subscribed[-1], "broker", None) == address


async def test_holding_the_intake_is_logged_once_a_period_not_per_hold(
    intake: tuple[Intake, Lagging],
    broker: Mosquitto,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collector, flow = intake
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(intake_module, "HOLD_REPORT_S", 2.0)
    flow.lagging = True

    await published(broker.port, 200)
    await eventually(lambda: spooled(collector), lambda count: count == 200, what="all spooled")
    assert collector.holds >= 20

    held = [record for record in caplog.records if "intake held" in record.getMessage()]
    assert len(held) == 1, [record.getMessage() for record in held]
    assert held[0].levelno == logging.INFO
    assert isinstance(getattr(held[0], "spool_seq", None), int)
    first_period = collector.holds

    # The next line, a period on, says how often and how long it held meanwhile.
    await asyncio.sleep(2.1)
    await published(broker.port, 10)
    await eventually(lambda: spooled(collector), lambda count: count == 210, what="all spooled")
    held = [record for record in caplog.records if "intake held" in record.getMessage()]
    assert len(held) == 2, [record.getMessage() for record in held]
    assert getattr(held[1], "holds", None) == first_period
    assert f"({first_period} holds, " in held[1].getMessage()


async def spooled(intake: Intake) -> int:
    return intake.spool.committed_seq + 1
