"""Device accounts on a real Mosquitto 2.0.11 with its dynamic-security plugin.

What a user would notice: a device connects with its own credential and nothing else does, it
reaches only its own topics, a rotated or removed credential stops working, and a broker that
lost its accounts is rebuilt from the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial

import aiomqtt
import pytest

from iotmeter.devicelink.credentials import SERVICE_USERNAME, derive_password
from iotmeter.devicelink.dynsec import (
    DEVICE_TEXTNAME,
    AccountsStatus,
    BrokerAccounts,
    DynsecControl,
)
from iotmeter.ingest.broker import BrokerAddress
from tests.fixtures.services import Mosquitto, running_mosquitto

SECRET = b"test secret for device passwords"
ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex
DELIVERY_WAIT_S = 1.0
"""How long a message that must not arrive is waited for (after one that must has arrived)."""


class MemorySource:
    """`AccountSource` over a dict: device -> (nonce, broker nonce)."""

    def __init__(self, nonces: dict[str, str] | None = None) -> None:
        self.rows: dict[str, tuple[str, str | None]] = {
            device_id: (nonce, None) for device_id, nonce in (nonces or {}).items()
        }
        self.marked: list[dict[str, str]] = []

    async def wanted(self) -> dict[str, tuple[str, str | None]]:
        return dict(self.rows)

    async def mark_applied(self, applied: dict[str, str]) -> None:
        self.marked.append(dict(applied))
        for device_id, nonce in applied.items():
            if device_id in self.rows:
                self.rows[device_id] = (self.rows[device_id][0], nonce)


def password(device_id: str, nonce: str = "n1") -> str:
    return derive_password(SECRET, device_id, nonce)


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with running_mosquitto(dynsec_admin=(SERVICE_USERNAME, ADMIN_PASSWORD)) as mosquitto:
        yield mosquitto


def accounts_for(broker: Mosquitto, source: MemorySource, **options: float) -> BrokerAccounts:
    return BrokerAccounts(
        BrokerAddress.from_url(broker.admin_url),
        source,
        partial(derive_password, SECRET),
        **options,
    )


async def reconcile(broker: Mosquitto, source: MemorySource) -> AccountsStatus:
    return await accounts_for(broker, source).reconcile_once()


@contextlib.asynccontextmanager
async def connected(
    broker: Mosquitto, username: str, secret: str, client_id: str | None = None
) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        username=username,
        password=secret,
        identifier=client_id if client_id is not None else username,
        timeout=5,
    ) as client:
        yield client


async def assert_refused(
    broker: Mosquitto, username: str, secret: str, client_id: str | None = None
) -> None:
    """The broker refuses this CONNECT as not authorised."""
    with pytest.raises(aiomqtt.MqttCodeError, match=r"(?i)not authori[sz]ed"):
        async with connected(broker, username, secret, client_id):
            pass


async def disconnected(client: aiomqtt.Client) -> None:
    """Return once the broker closes this client's connection (fail after 5 s)."""
    async with asyncio.timeout(5):
        with contextlib.suppress(aiomqtt.MqttError):
            async for _message in client.messages:
                pass


@contextlib.asynccontextmanager
async def service_subscriber(
    broker: Mosquitto, topic_filter: str
) -> AsyncIterator[asyncio.Queue[tuple[str, bytes]]]:
    """Messages on `topic_filter` as the service account receives them."""
    received: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    async with connected(
        broker, SERVICE_USERNAME, ADMIN_PASSWORD, f"svc-{uuid.uuid4().hex[:6]}"
    ) as client:
        await client.subscribe(topic_filter, qos=1)

        async def read() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                await received.put((message.topic.value, message.payload))

        reader = asyncio.create_task(read())
        try:
            yield received
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def next_message(queue: asyncio.Queue[tuple[str, bytes]]) -> tuple[str, bytes]:
    return await asyncio.wait_for(queue.get(), 5.0)


# --- authentication ------------------------------------------------------------------------


async def test_wrong_password_and_unknown_device_are_refused(broker: Mosquitto) -> None:
    source = MemorySource({"meter-1": "n1"})
    status = await reconcile(broker, source)
    assert (status.created, status.failed) == (1, 0)

    await assert_refused(broker, "meter-1", password("meter-1", "other nonce"))
    await assert_refused(broker, "meter-1", "")
    await assert_refused(broker, "meter-2", password("meter-2"))
    async with connected(broker, "meter-1", password("meter-1")):
        pass
    assert source.rows == {"meter-1": ("n1", "n1")}


async def test_client_id_other_than_the_device_id_is_refused(broker: Mosquitto) -> None:
    await reconcile(broker, MemorySource({"meter-1": "n1"}))
    await assert_refused(broker, "meter-1", password("meter-1"), client_id="meter-1-b")
    await assert_refused(broker, "meter-1", password("meter-1"), client_id="meter-2")


async def test_second_pass_changes_nothing(broker: Mosquitto) -> None:
    source = MemorySource({f"meter-{n}": "n1" for n in range(20)})
    first = await reconcile(broker, source)
    assert (first.created, first.devices_on_broker) == (20, 20)
    second = await reconcile(broker, source)
    assert (second.created, second.updated, second.deleted, second.failed) == (0, 0, 0, 0)
    assert second.devices_on_broker == 20


# --- authorisation -------------------------------------------------------------------------


async def test_device_telemetry_reaches_the_service_account(broker: Mosquitto) -> None:
    await reconcile(broker, MemorySource({"meter-1": "n1"}))
    async with service_subscriber(broker, "iot/#") as received:
        async with connected(broker, "meter-1", password("meter-1")) as device:
            await device.publish("iot/meter-1/telemetry", b'{"t": 1}', qos=1)
            await device.publish("iot/meter-1/status", b"online", qos=1)
            await device.publish("iot/meter-1/config/reported", b"{}", qos=1)
        got = [await next_message(received) for _ in range(3)]
    assert got == [
        ("iot/meter-1/telemetry", b'{"t": 1}'),
        ("iot/meter-1/status", b"online"),
        ("iot/meter-1/config/reported", b"{}"),
    ]


async def test_device_cannot_publish_into_another_devices_topics(broker: Mosquitto) -> None:
    await reconcile(broker, MemorySource({"meter-a": "n1", "meter-b": "n1"}))
    async with service_subscriber(broker, "#") as received:
        async with connected(broker, "meter-a", password("meter-a")) as device:
            for topic in (
                "iot/meter-b/telemetry",
                "iot/meter-b/config",
                "iot/meter-a/config",  # only iotmeter publishes desired configuration
                "iot/meter-a/other",
                "elsewhere",
            ):
                await device.publish(topic, b"forged", qos=1)
            # Delivered in order: once the marker is here, the forged ones would have been too.
            await device.publish("iot/meter-a/telemetry", b"marker", qos=1)
        assert await next_message(received) == ("iot/meter-a/telemetry", b"marker")
        await asyncio.sleep(DELIVERY_WAIT_S / 4)
        assert received.empty()


async def test_device_cannot_subscribe_to_another_devices_config(broker: Mosquitto) -> None:
    await reconcile(broker, MemorySource({"meter-a": "n1", "meter-b": "n1"}))
    async with connected(broker, "meter-a", password("meter-a")) as device:
        granted = await device.subscribe("iot/meter-a/config", qos=1)
        assert [code.value for code in granted] == [1]
        for topic_filter in ("iot/meter-b/config", "iot/+/config", "iot/#", "#"):
            refused = await device.subscribe(topic_filter, qos=1)
            assert [code.value for code in refused] == [0x80], topic_filter
        async with connected(broker, SERVICE_USERNAME, ADMIN_PASSWORD, "svc-pub") as service:
            await service.publish("iot/meter-b/config", b"for b", qos=1)
            await service.publish("iot/meter-a/config", b"for a", qos=1)

        async def first() -> tuple[str, bytes]:
            async for message in device.messages:
                assert isinstance(message.payload, bytes)
                return message.topic.value, message.payload
            raise AssertionError("connection closed")

        assert await asyncio.wait_for(first(), 5) == ("iot/meter-a/config", b"for a")


# --- changes in the registry ---------------------------------------------------------------


async def test_rotated_credential_rejects_the_old_password(broker: Mosquitto) -> None:
    source = MemorySource({"meter-1": "n1"})
    await reconcile(broker, source)
    async with connected(broker, "meter-1", password("meter-1", "n1")) as old_session:
        source.rows["meter-1"] = ("n2", "n1")
        status = await reconcile(broker, source)
        assert (status.created, status.updated) == (0, 1)
        # The broker drops a session that logged in with the old password.
        await disconnected(old_session)
    assert source.rows["meter-1"] == ("n2", "n2")
    await assert_refused(broker, "meter-1", password("meter-1", "n1"))
    async with connected(broker, "meter-1", password("meter-1", "n2")):
        pass


async def test_removed_device_can_no_longer_connect_and_other_accounts_stay(
    broker: Mosquitto,
) -> None:
    source = MemorySource({"meter-1": "n1", "meter-2": "n1"})
    await reconcile(broker, source)
    del source.rows["meter-1"]
    status = await reconcile(broker, source)
    assert (status.deleted, status.devices_on_broker) == (1, 1)
    await assert_refused(broker, "meter-1", password("meter-1"))
    async with connected(broker, "meter-2", password("meter-2")):
        pass
    # The admin account (never a device client) is untouched.
    async with connected(broker, SERVICE_USERNAME, ADMIN_PASSWORD, "svc-check"):
        pass


async def test_device_id_of_a_foreign_account_is_never_taken_over(broker: Mosquitto) -> None:
    source = MemorySource({SERVICE_USERNAME: "n1", "meter-1": "n1"})
    status = await reconcile(broker, source)
    assert (status.created, status.conflicts) == (1, 1)
    assert source.rows[SERVICE_USERNAME] == ("n1", None)  # not marked: it was not applied
    async with connected(broker, SERVICE_USERNAME, ADMIN_PASSWORD, "svc-check"):
        pass
    await assert_refused(broker, SERVICE_USERNAME, password(SERVICE_USERNAME), SERVICE_USERNAME)
    # Deleting the device does not delete the account of that name either.
    del source.rows[SERVICE_USERNAME]
    assert (await reconcile(broker, source)).deleted == 0
    async with connected(broker, SERVICE_USERNAME, ADMIN_PASSWORD, "svc-check"):
        pass


async def test_drifted_account_is_repaired(broker: Mosquitto) -> None:
    """Someone changed a device's client id and role by hand: the next pass puts them back."""
    source = MemorySource({"meter-1": "n1"})
    await reconcile(broker, source)
    accounts = accounts_for(broker, source)
    async with DynsecControl.connect(accounts.broker, timeout_s=30) as control:
        results = await control.execute(
            [
                {"command": "modifyClient", "username": "meter-1", "clientid": "hijack"},
                {
                    "command": "removeRoleACL",
                    "rolename": "iotmeter-device-meter-1",
                    "acltype": "publishClientSend",
                    "topic": "iot/meter-1/telemetry",
                },
                {"command": "createClient", "username": "meter-1", "password": "x"},
            ]
        )
        assert [result.error for result in results] == [None, None, "Client already exists"]
        status = await accounts.reconcile(control)
        assert (status.updated, status.failed) == (1, 0)
        listing = await control.execute([{"command": "getClient", "username": "meter-1"}])
    client = listing[0].data["client"]
    assert (client["clientid"], client["textname"]) == ("meter-1", DEVICE_TEXTNAME)
    async with service_subscriber(broker, "iot/#") as received:
        async with connected(broker, "meter-1", password("meter-1")) as device:
            await device.publish("iot/meter-1/telemetry", b"back", qos=1)
        assert await next_message(received) == ("iot/meter-1/telemetry", b"back")


@pytest.mark.parametrize(
    "device_id",
    ["d" * 64, "dots.in.the.id", "-dash-first", "under_score", "a", "x.", "0.0.0.0"],
)
async def test_device_ids_at_the_patterns_limits(broker: Mosquitto, device_id: str) -> None:
    neighbour = device_id[:-1] + ("_" if device_id[-1] != "_" else "-")
    source = MemorySource({device_id: "n1", neighbour: "n1"})
    status = await reconcile(broker, source)
    assert (status.created, status.failed) == (2, 0)
    async with service_subscriber(broker, "iot/#") as received:
        async with connected(broker, device_id, password(device_id)) as device:
            await device.publish(f"iot/{neighbour}/telemetry", b"forged", qos=1)
            await device.publish(f"iot/{device_id}/telemetry", b"own", qos=1)
        assert await next_message(received) == (f"iot/{device_id}/telemetry", b"own")
        await asyncio.sleep(DELIVERY_WAIT_S / 4)
        assert received.empty()


# --- the running reconciler ----------------------------------------------------------------


async def wait_for_pass(accounts: BrokerAccounts, after: int) -> None:
    """Until the reconciler has finished a pass after its `after`th."""
    for _ in range(600):
        if accounts.status.passes > after:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no pass after pass {after}: {accounts.status}")


async def test_broker_that_lost_its_accounts_is_rebuilt(broker: Mosquitto) -> None:
    source = MemorySource({"meter-1": "n1", "meter-2": "n1"})
    accounts = accounts_for(broker, source, period_s=600)
    task = asyncio.create_task(accounts.run())
    try:
        await wait_for_pass(accounts, 0)
        assert accounts.status.created == 2
        assert "2 device accounts" in (await accounts.health() or "")
        async with connected(broker, "meter-1", password("meter-1")):
            pass

        # A change is applied on wake(), without waiting for the period.
        source.rows["meter-3"] = ("n1", None)
        passes = accounts.status.passes
        accounts.wake()
        await wait_for_pass(accounts, passes)
        async with connected(broker, "meter-3", password("meter-3")):
            pass

        broker.stop()
        broker.init_dynsec()  # the file is lost: only the admin account remains
        passes = accounts.status.passes
        broker.start()
        await wait_for_pass(accounts, passes)
        assert accounts.status.created == 3
        for device_id in ("meter-1", "meter-2", "meter-3"):
            async with connected(broker, device_id, password(device_id)):
                pass
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
