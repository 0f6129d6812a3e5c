"""Time to give N devices their broker accounts through the dynamic-security reconciler.

    .venv/bin/python bench/device_credentials.py                  # 10,000 devices
    .venv/bin/python bench/device_credentials.py --devices 2000 --target-message-s 2

Starts a private Mosquitto 2.0.11 with the plugin (loopback, free port), runs one full pass of
`BrokerAccounts` for N new credentials (in-memory registry), and prints the seconds, devices per
second, the messages the commands went in, the broker's dynsec file size, and the time until the
first device then connects with its password. A second pass shows what a pass that changes
nothing costs (every (re)connect and every period runs one).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
from functools import partial
from pathlib import Path

import aiomqtt

from iotmeter.devicelink.credentials import SERVICE_USERNAME, derive_password
from iotmeter.devicelink.dynsec import BrokerAccounts, DynsecControl
from iotmeter.ingest.broker import BrokerAddress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures.services import running_mosquitto

SECRET = b"bench secret"


class MemorySource:
    def __init__(self, count: int) -> None:
        self.rows: dict[str, tuple[str, str | None]] = {
            f"bench-{n:05d}": ("n1", None) for n in range(count)
        }

    async def wanted(self) -> dict[str, tuple[str, str | None]]:
        return dict(self.rows)

    async def mark_applied(self, applied: dict[str, str]) -> None:
        for device_id, nonce in applied.items():
            self.rows[device_id] = (self.rows[device_id][0], nonce)


class CountingControl(DynsecControl):
    """Counts messages and the slowest answer (how long the broker was busy at a stretch)."""

    messages = 0
    slowest_s = 0.0

    async def execute(self, commands):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        try:
            return await super().execute(commands)
        finally:
            CountingControl.messages += 1
            CountingControl.slowest_s = max(CountingControl.slowest_s, time.monotonic() - started)


async def first_connect(port: int, device_id: str) -> float:
    started = time.monotonic()
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        username=device_id,
        password=derive_password(SECRET, device_id, "n1"),
        identifier=device_id,
    ):
        pass
    return time.monotonic() - started


async def run(devices: int, target_message_s: float) -> None:
    admin_password = "bench-admin"
    with running_mosquitto(dynsec_admin=(SERVICE_USERNAME, admin_password)) as broker:
        source = MemorySource(devices)
        accounts = BrokerAccounts(
            BrokerAddress.from_url(broker.admin_url),
            source,
            partial(derive_password, SECRET),
            target_message_s=target_message_s,
            timeout_s=600,
        )
        # The admin gets the service role first (the broker drops the connection for it).
        address, derive = accounts.broker, accounts.password_for
        await BrokerAccounts(address, MemorySource(0), derive).reconcile_once()
        async with CountingControl.connect(accounts.broker, timeout_s=600) as control:
            started = time.monotonic()
            status = dataclasses.replace(await accounts.reconcile(control))
            elapsed = time.monotonic() - started
            to_connect = await first_connect(broker.port, "bench-00000")
            idle_started = time.monotonic()
            idle = await accounts.reconcile(control)
            idle_s = time.monotonic() - idle_started
        applied = sum(1 for nonce, on_broker in source.rows.values() if nonce == on_broker)
        print(f"devices            {devices}")
        print(f"created            {status.created} (refused {status.failed}, marked {applied})")
        print(f"seconds            {elapsed:.1f}")
        print(f"devices per second {status.created / elapsed:.0f}")
        print(
            f"messages           {CountingControl.messages} "
            f"(slowest answer {CountingControl.slowest_s:.2f} s)"
        )
        print(f"dynsec file        {broker.dynsec_file.stat().st_size / 1e6:.1f} MB")
        print(f"first connect      {to_connect * 1000:.0f} ms after the pass")
        print(f"pass, no change    {idle_s:.2f} s ({idle.created + idle.updated} changes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument(
        "--target-message-s",
        type=float,
        default=1.0,
        help="broker time each control message is sized for",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args.devices, args.target_message_s))


if __name__ == "__main__":
    main()
