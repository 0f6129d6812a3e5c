"""Fixtures of the fault-injection tests: a broker and a database each test may break."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.fixtures.services import (
    Mosquitto,
    create_pg_database,
    drop_pg_database,
    free_port,
    writable_by_mosquitto,
)

# Room for every message of a run while the app is down: the broker must never be what drops.
MAX_QUEUED_MESSAGES = 1_000_000


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """The test's own Mosquitto, persistence on; it may be stopped and started again.

    Its log is copied to the test's tmp folder (`mosquitto.log`) at the end."""
    if shutil.which("mosquitto") is None:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    with tempfile.TemporaryDirectory(prefix="iotmeter-fault-mosquitto-") as workdir:
        folder = Path(workdir)
        writable_by_mosquitto(folder)
        mosquitto = Mosquitto(
            port=free_port(),
            workdir=folder,
            persistence=True,
            max_queued_messages=MAX_QUEUED_MESSAGES,
        )
        try:
            mosquitto.start()
            # The log is opened at start-up: if it is missing, the broker cannot write its
            # folder, and the persistence these tests rely on is off.
            deadline = time.monotonic() + 5
            while not (folder / "mosquitto.log").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Mosquitto cannot write {folder}: persistence is off")
                time.sleep(0.05)
            yield mosquitto
        finally:
            mosquitto.stop()
            if (folder / "mosquitto.log").exists():
                shutil.copyfile(folder / "mosquitto.log", tmp_path / "mosquitto.log")


@pytest.fixture
async def fresh_database() -> AsyncIterator[str]:
    """A new, empty database on the shared server (the app migrates it at start-up)."""
    url = await create_pg_database("iotmeter_fault")
    yield url
    await drop_pg_database(url)
