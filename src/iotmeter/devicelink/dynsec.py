"""Device accounts on Mosquitto 2.0, kept equal to the registry over its dynamic-security plugin.

iotmeter is the plugin's admin client: it publishes command lists to `$CONTROL/dynamic-security/v1`
and reads the answers on `.../response`. Each device gets a broker client (username and client id
= device id, password derived from its credential's nonce) and a role of its own,
`iotmeter-device-{id}`, that allows exactly the device's topics (`devicelink.acl`). A role per
device, not one shared role with `%u` topics: the 2.0.11 plugin matches ACL topics literally
(`iot/%u/telemetry` allows a publish to that very topic, and none to `iot/dev1/telemetry`).

The registry is the truth. Each pass lists the broker's clients and roles, creates what is
missing, sets the password where the registry's nonce differs from the one the broker was last
given, repairs drifted client ids, roles and ACLs, and deletes device clients and roles the
registry no longer has. Clients that are not iotmeter devices (the admin, operators' accounts) are
never touched. A pass runs at every (re)connect, so a broker that lost its dynsec file is rebuilt,
on `wake()` (a credential changed), and every `period_s`.

Cost: the 2.0.11 plugin writes its whole JSON file after every modifying command, on the broker's
only thread, so a command costs time in proportion to the accounts already there (~12 ms per MB
of file, ~0.6 KB per device). Commands therefore go in messages sized to keep the broker busy
about `target_message_s` each (the broker serves other clients between messages), one message
in flight, and only commands that change something are sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiomqtt
import orjson
from sqlalchemy.exc import SQLAlchemyError

from iotmeter.devicelink import acl
from iotmeter.errors import BackendUnavailable, IotmeterError
from iotmeter.ingest.broker import BrokerAddress
from iotmeter.retry import Backoff, describe

logger = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
CONTROL_FILTER = "$CONTROL/dynamic-security/#"
DEVICE_ROLE_PREFIX = "iotmeter-device-"
SERVICE_ROLE = "iotmeter-service"
DEVICE_TEXTNAME = "iotmeter device"
"""Marks the broker clients iotmeter owns: only these are ever changed or deleted."""

Command = dict[str, Any]

OWN_ROLE_DROP_WAIT_S = 5.0

DEFAULT_ACL_ACCESS: tuple[tuple[str, bool], ...] = (
    ("publishClientSend", False),
    ("publishClientReceive", True),
    ("subscribe", False),
    ("unsubscribe", True),
)
"""Whatever no role allows is refused; receiving is left open (subscriptions are restricted)."""

SERVICE_ACLS: tuple[tuple[str, str], ...] = (
    ("publishClientSend", "iot/#"),
    ("publishClientReceive", "iot/#"),
    ("subscribePattern", "iot/#"),
    ("publishClientSend", CONTROL_FILTER),
    ("publishClientReceive", CONTROL_FILTER),
    ("subscribePattern", CONTROL_FILTER),
)


class AccountSource(Protocol):
    """The registry's device credentials, as the reconciler needs them."""

    async def wanted(self) -> dict[str, tuple[str, str | None]]:
        """device_id -> (nonce, broker_nonce): every device that has a credential; broker_nonce
        is the nonce the broker was last given (None: never)."""
        ...

    async def mark_applied(self, applied: dict[str, str]) -> None:
        """Record device_id -> nonce now on the broker."""
        ...


def device_role(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + device_id


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """The device role's ACLs: its own topics, exact names (subscribeLiteral: no wildcards)."""
    acls = [
        {"acltype": "publishClientSend", "topic": topic, "allow": True}
        for topic in acl.publish_topics(device_id)
    ]
    acls += [
        {"acltype": "subscribeLiteral", "topic": topic, "allow": True}
        for topic in acl.subscribe_filters(device_id)
    ]
    return acls


def _acl_set(acls: Sequence[Mapping[str, Any]]) -> set[tuple[str, str, bool]]:
    return {(str(a.get("acltype")), str(a.get("topic")), bool(a.get("allow"))) for a in acls}


# --- the plugin's admin client -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The plugin's answer to one command: `error` is its message (None: it worked)."""

    command: str
    error: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


_HARMLESS_ERRORS = {
    # Already as wanted (a concurrent change, or a repeated message).
    ("createRole", "Role already exists"),
    ("deleteClient", "Client not found"),
    ("deleteRole", "Role not found"),
}


def succeeded(result: CommandResult) -> bool:
    """Worked, or failed only because the broker already had what the command asked for."""
    return result.ok or (result.command, result.error) in _HARMLESS_ERRORS


class DynsecUnavailable(BackendUnavailable):
    """The broker's dynamic-security plugin did not answer, or refused to list or set up."""


class DynsecControl:
    """One connection to the plugin: sends command lists, awaits the answers, in order.

    The plugin answers each message with one message carrying a result per command; every
    command carries `correlationData` `{message id}:{index}`, so answers to other admin clients
    (all admins read the same response topic) are told apart and each result finds its command.
    """

    def __init__(self, client: aiomqtt.Client, *, timeout_s: float) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self._pending: dict[str, asyncio.Future[list[CommandResult]]] = {}
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        broker: BrokerAddress,
        *,
        tls_context: ssl.SSLContext | None = None,
        timeout_s: float = 60.0,
    ) -> AsyncIterator[DynsecControl]:
        """Connect as the admin account of `broker`'s URL and subscribe to the answers."""
        client = aiomqtt.Client(
            broker.host,
            broker.port,
            username=broker.username,
            password=broker.password,
            identifier=f"iotmeter-dynsec-{uuid.uuid4().hex[:8]}",
            tls_context=tls_context,
            clean_session=True,
        )
        # The connect runs partly in a worker thread that cancellation cannot stop; cancelling
        # the wait alone would leave a live connection behind. Let it finish, then close it.
        entering = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.shield(entering)
        except asyncio.CancelledError:
            with contextlib.suppress(aiomqtt.MqttError):
                await entering
                await client.__aexit__(None, None, None)
            raise
        control = cls(client, timeout_s=timeout_s)
        try:
            await client.subscribe(RESPONSE_TOPIC, qos=1)
            control._reader = asyncio.create_task(control._read(), name="dynsec-responses")
            yield control
        except BaseException as exc:
            await control._close()
            await client.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        await control._close()
        await client.__aexit__(None, None, None)

    async def wait_closed(self) -> None:
        """Return (raising `MqttError`) when the connection is lost."""
        assert self._reader is not None
        await asyncio.shield(self._reader)

    async def execute(self, commands: Sequence[Command]) -> list[CommandResult]:
        """Send `commands` as one message; their results in the same order.

        Raises `BackendUnavailable` when no answer comes within `timeout_s` (the connection
        is then best dropped: a late answer is ignored) and `MqttError` when the connection
        is lost."""
        if not commands:
            return []
        message_id = uuid.uuid4().hex[:12]
        tagged = [
            {**command, "correlationData": f"{message_id}:{index}"}
            for index, command in enumerate(commands)
        ]
        answer: asyncio.Future[list[CommandResult]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = answer
        try:
            await self.client.publish(CONTROL_TOPIC, orjson.dumps({"commands": tagged}), qos=1)
            closed: asyncio.Future[None] = asyncio.ensure_future(self.wait_closed())
            waiting: set[asyncio.Future[Any]] = {answer, closed}
            done, _ = await asyncio.wait(
                waiting, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            closed.cancel()
            if answer in done:
                results = answer.result()
            elif closed in done:
                closed.result()  # raises the connection's error
                raise aiomqtt.MqttError("connection closed")
            else:
                raise DynsecUnavailable(
                    f"the broker's dynamic-security plugin did not answer {len(commands)} "
                    f"commands within {self.timeout_s:.0f} s (is the account of the broker "
                    "URL a dynsec admin, with `mosquitto_ctrl dynsec init`?)"
                )
        finally:
            self._pending.pop(message_id, None)
        return _in_order(commands, results)

    async def execute_and_drop(self, commands: Sequence[Command]) -> None:
        """Send commands that change this connection's own account, and wait for the plugin
        to drop the connection: 2.0.11 disconnects a client whose roles change (so that its
        ACLs are checked afresh), before it acknowledges or answers. No results come back."""
        tagged = [{**command, "correlationData": "drop"} for command in commands]
        # QoS 0: the PUBACK of QoS 1 never comes and would be waited for until the timeout.
        await self.client.publish(CONTROL_TOPIC, orjson.dumps({"commands": tagged}), qos=0)
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await asyncio.wait_for(self.wait_closed(), OWN_ROLE_DROP_WAIT_S)

    async def _read(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            try:
                responses = orjson.loads(payload)["responses"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                logger.debug("dynsec: ignored an answer that is not a response list")
                continue
            self._take(responses)
        raise aiomqtt.MqttError("message iteration ended")

    def _take(self, responses: Any) -> None:
        results: list[CommandResult] = []
        message_id: str | None = None
        for index, response in enumerate(responses if isinstance(responses, list) else ()):
            if not isinstance(response, dict):
                continue
            correlation = str(response.get("correlationData", ""))
            owner, _, position = correlation.partition(":")
            if message_id is None:
                message_id = owner
            if owner != message_id or position != str(index):
                logger.warning("dynsec: an answer's results do not match its commands")
                return
            error = response.get("error")
            data = response.get("data")
            results.append(
                CommandResult(
                    command=str(response.get("command", "")),
                    error=None if error is None else str(error),
                    data=data if isinstance(data, dict) else {},
                )
            )
        answer = self._pending.get(message_id or "")
        if answer is not None and not answer.done():
            answer.set_result(results)

    async def _close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader


def _in_order(commands: Sequence[Command], results: list[CommandResult]) -> list[CommandResult]:
    """One result per command; a command the plugin skipped reads as failed."""
    if len(results) == len(commands):
        return results
    missing = [
        CommandResult(str(command["command"]), "no answer from the plugin")
        for command in commands[len(results) :]
    ]
    return results[: len(commands)] + missing


# --- what a pass changes -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BrokerClient:
    username: str
    clientid: str | None
    roles: tuple[str, ...]
    textname: str | None

    @property
    def is_device(self) -> bool:
        """Made by iotmeter for a device (never true of the admin or operators' accounts)."""
        return self.textname == DEVICE_TEXTNAME


@dataclass(frozen=True, slots=True)
class DeviceChange:
    """The commands for one device; it counts as applied (at `nonce`) when all succeeded."""

    device_id: str
    kind: str
    """`create`, `repair`, `password`, `delete` (client and role) or `cleanup` (a role alone)."""
    commands: tuple[Command, ...]
    nonce: str | None = None


@dataclass
class Plan:
    changes: list[DeviceChange] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    """Devices whose username belongs to a broker client iotmeter does not own."""
    unchanged: int = 0


def parse_clients(data: Mapping[str, Any]) -> dict[str, BrokerClient]:
    """`listClients` (verbose) data -> username -> client."""
    clients: dict[str, BrokerClient] = {}
    for item in data.get("clients", ()):
        roles = tuple(str(role.get("rolename")) for role in item.get("roles", ()))
        username = str(item.get("username"))
        clients[username] = BrokerClient(
            username=username,
            clientid=item.get("clientid"),
            roles=roles,
            textname=item.get("textname"),
        )
    return clients


def parse_roles(data: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """`listRoles` (verbose) data -> role name -> ACLs."""
    return {str(item.get("rolename")): list(item.get("acls", ())) for item in data.get("roles", ())}


def plan_pass(
    wanted: Mapping[str, tuple[str, str | None]],
    clients: Mapping[str, BrokerClient],
    roles: Mapping[str, list[dict[str, Any]]],
    password_for: Callable[[str, str], str],
) -> Plan:
    """The commands that make the broker's device accounts equal to `wanted`."""
    plan = Plan()
    for device_id, (nonce, broker_nonce) in wanted.items():
        role = device_role(device_id)
        client = clients.get(device_id)
        if client is not None and not client.is_device:
            plan.conflicts.append(device_id)
            continue
        commands: list[Command] = []
        role_acls = roles.get(role)
        role_ok = role_acls is not None and _acl_set(role_acls) == _acl_set(device_acls(device_id))
        if role_acls is not None and not role_ok:
            commands.append({"command": "deleteRole", "rolename": role})
        if not role_ok:
            commands.append(
                {"command": "createRole", "rolename": role, "acls": device_acls(device_id)}
            )
        account = {
            "username": device_id,
            "password": password_for(device_id, nonce),
            "clientid": device_id,
            "textname": DEVICE_TEXTNAME,
            "roles": [{"rolename": role}],
        }
        if client is None:
            plan.changes.append(
                DeviceChange(
                    device_id, "create", (*commands, {"command": "createClient", **account}), nonce
                )
            )
        elif not role_ok or client.clientid != device_id or client.roles != (role,):
            # deleteRole took the role from the client too: give it back with the rest.
            plan.changes.append(
                DeviceChange(
                    device_id, "repair", (*commands, {"command": "modifyClient", **account}), nonce
                )
            )
        elif nonce != broker_nonce:
            password = {"username": device_id, "password": account["password"]}
            plan.changes.append(
                DeviceChange(
                    device_id, "password", ({"command": "setClientPassword", **password},), nonce
                )
            )
        else:
            plan.unchanged += 1
    for username, client in clients.items():
        if client.is_device and username not in wanted:
            commands = [{"command": "deleteClient", "username": username}]
            if device_role(username) in roles:
                commands.append({"command": "deleteRole", "rolename": device_role(username)})
            plan.changes.append(DeviceChange(username, "delete", tuple(commands)))
    for name in roles:
        device_id = name[len(DEVICE_ROLE_PREFIX) :]
        if name.startswith(DEVICE_ROLE_PREFIX) and device_id not in wanted:
            client = clients.get(device_id)
            if client is None or not client.is_device:
                # A role left over without its client (a pass cut short): no device to count.
                command = {"command": "deleteRole", "rolename": name}
                plan.changes.append(DeviceChange(device_id, "cleanup", (command,)))
    return plan


def service_commands(
    service_role_acls: list[dict[str, Any]] | None,
    default_access: Sequence[Mapping[str, Any]],
) -> list[Command]:
    """What makes the defaults deny-by-default and the service role complete."""
    commands: list[Command] = []
    current = {str(item.get("acltype")): bool(item.get("allow")) for item in default_access}
    if any(current.get(kind) != allow for kind, allow in DEFAULT_ACL_ACCESS):
        acls = [{"acltype": kind, "allow": allow} for kind, allow in DEFAULT_ACL_ACCESS]
        commands.append({"command": "setDefaultACLAccess", "acls": acls})
    wanted = [{"acltype": kind, "topic": topic, "allow": True} for kind, topic in SERVICE_ACLS]
    if service_role_acls is None:
        commands.append({"command": "createRole", "rolename": SERVICE_ROLE, "acls": wanted})
    else:
        # Only adds: ACLs an operator added to the role stay.
        have = _acl_set(service_role_acls)
        commands += [
            {"command": "addRoleACL", "rolename": SERVICE_ROLE, **item}
            for item in wanted
            if (item["acltype"], item["topic"], True) not in have
        ]
    return commands


# --- the reconciler ------------------------------------------------------------------------


class MessageSizer:
    """How many commands the next message carries: as many as the broker handles in about
    `target_s`, from the time the last message took (the cost per command grows with the
    number of accounts, so it is measured, not fixed)."""

    def __init__(
        self, *, target_s: float = 1.0, initial: int = 100, minimum: int = 10, maximum: int = 1000
    ) -> None:
        self.target_s = target_s
        self.minimum = minimum
        self.maximum = maximum
        self.size = initial

    def observe(self, commands: int, seconds: float) -> None:
        if commands <= 0:
            return
        per_command = max(seconds, 1e-6) / commands
        wanted = int(self.target_s / per_command)
        # At most double per step: one quick answer (a small broker) is no promise.
        self.size = max(self.minimum, min(self.maximum, wanted, self.size * 2))


@dataclass
class AccountsStatus:
    """What the reconciler did last, for health and the API."""

    connected: bool = False
    last_reconcile_at: datetime | None = None
    last_duration_s: float | None = None
    passes: int = 0
    devices_wanted: int = 0
    devices_on_broker: int = 0
    """Device clients on the broker after the last pass."""
    created: int = 0
    updated: int = 0
    deleted: int = 0
    failed: int = 0
    """Changes of the last pass the broker refused (tried again at the next pass)."""
    conflicts: int = 0
    """Devices whose id is the username of a broker account iotmeter does not own."""
    last_error: str | None = None


class OwnRoleChanged(Exception):
    """The admin account was just given the service role, and the broker dropped the
    connection for it: connect again (at once) and carry on."""


@dataclass
class _PassCounts:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


class BrokerAccounts:
    """Keeps Mosquitto's device accounts equal to the registry's credentials (see module doc)."""

    def __init__(
        self,
        broker: BrokerAddress,
        source: AccountSource,
        password_for: Callable[[str, str], str],
        *,
        tls_context: ssl.SSLContext | None = None,
        period_s: float = 60.0,
        retry_s: float = 5.0,
        timeout_s: float = 60.0,
        target_message_s: float = 1.0,
    ) -> None:
        self.broker = broker
        self.source = source
        self.password_for = password_for
        self.tls_context = tls_context
        self.period_s = period_s
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.target_message_s = target_message_s
        self.status = AccountsStatus()
        self._wake = asyncio.Event()
        self._sizer = MessageSizer(target_s=target_message_s)
        self._gave_own_role = False

    def wake(self) -> None:
        """Credentials changed (committed): reconcile now."""
        self._wake.set()

    async def health(self) -> str | None:
        """A short detail when the last pass worked; `BackendUnavailable` when not."""
        status = self.status
        if not status.connected or status.last_reconcile_at is None:
            raise BackendUnavailable(
                f"broker accounts not reconciled: {status.last_error or 'not connected yet'}"
            )
        return (
            f"{status.devices_on_broker} device accounts on the broker, "
            f"last reconciled {status.last_reconcile_at.isoformat(timespec='seconds')}"
        )

    async def run(self) -> None:
        """Reconcile at every (re)connect, on `wake()` and every `period_s`, until cancelled."""
        backoff = Backoff("broker accounts", initial=1.0, quiet=True)
        while True:
            error: BaseException | None = None
            try:
                async with DynsecControl.connect(
                    self.broker, tls_context=self.tls_context, timeout_s=self.timeout_s
                ) as control:
                    self.status.connected = True
                    logger.info("broker accounts: connected to the %s", self.broker.describe())
                    await self._serve(control, backoff)
            except OwnRoleChanged:
                continue
            except (aiomqtt.MqttError, DynsecUnavailable) as exc:
                error = exc
            finally:
                self.status.connected = False
            self.status.last_error = describe(error) if error else None
            # Once per outage; the retries in between at debug level.
            logger.log(
                logging.DEBUG if backoff.failing else logging.WARNING,
                "broker accounts: connection to the %s lost or refused (%s); retrying",
                self.broker.describe(),
                self.status.last_error,
            )
            await backoff.wait(error)

    async def _serve(self, control: DynsecControl, backoff: Backoff) -> None:
        closed: asyncio.Future[None] = asyncio.ensure_future(control.wait_closed())
        try:
            while True:
                self._wake.clear()
                try:
                    status = await self.reconcile(control)
                    backoff.succeeded()
                    # Refused changes ("Client already exists" after another process's create)
                    # are tried again soon; a refusal that lasts costs a listing per retry.
                    delay = min(self.retry_s, self.period_s) if status.failed else self.period_s
                except (DynsecUnavailable, aiomqtt.MqttError, OwnRoleChanged):
                    raise
                except (IotmeterError, SQLAlchemyError, OSError) as exc:
                    # The registry failed: keep the connection, try again after a pause.
                    self.status.last_error = describe(exc)
                    logger.warning("broker accounts: pass failed: %s", self.status.last_error)
                    delay = backoff.next_delay(exc)
                woken: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
                waiting: set[asyncio.Future[Any]] = {woken, closed}
                done, _ = await asyncio.wait(
                    waiting, timeout=delay, return_when=asyncio.FIRST_COMPLETED
                )
                woken.cancel()
                if closed in done:
                    closed.result()
                    raise aiomqtt.MqttError("connection closed")
        finally:
            closed.cancel()

    async def reconcile_once(self) -> AccountsStatus:
        """Connect, make one full pass, disconnect (tools and tests; `run` keeps at it)."""
        for _attempt in range(2):
            try:
                async with DynsecControl.connect(
                    self.broker, tls_context=self.tls_context, timeout_s=self.timeout_s
                ) as control:
                    return await self.reconcile(control)
            except OwnRoleChanged:
                continue
        raise DynsecUnavailable("the broker kept dropping the admin connection")

    async def reconcile(self, control: DynsecControl) -> AccountsStatus:
        """One full pass: the broker's device accounts made equal to the registry's."""
        started = time.monotonic()
        listing = await control.execute(
            [
                {"command": "listClients", "verbose": True},
                {"command": "listRoles", "verbose": True},
                {"command": "getDefaultACLAccess"},
            ]
        )
        for result in listing:
            if not result.ok:
                raise DynsecUnavailable(f"dynamic-security {result.command}: {result.error}")
        clients = parse_clients(listing[0].data)
        roles = parse_roles(listing[1].data)
        await self._ensure_service(control, clients, roles, listing[2].data)
        wanted = await self.source.wanted()
        plan = plan_pass(wanted, clients, roles, self.password_for)
        counts = await self._apply(control, plan.changes)
        for device_id in plan.conflicts:
            logger.error(
                "broker accounts: device %s not given a broker account: the broker has an "
                "account of that name that iotmeter does not own",
                device_id,
            )
        on_broker = sum(1 for client in clients.values() if client.is_device)
        self._record(started, len(wanted), on_broker, counts, len(plan.conflicts))
        return self.status

    async def _ensure_service(
        self,
        control: DynsecControl,
        clients: Mapping[str, BrokerClient],
        roles: Mapping[str, list[dict[str, Any]]],
        default_access: Mapping[str, Any],
    ) -> None:
        commands = service_commands(roles.get(SERVICE_ROLE), default_access.get("acls", ()))
        for result in await control.execute(commands):
            if not succeeded(result):
                raise DynsecUnavailable(f"dynamic-security {result.command}: {result.error}")
        if commands:
            logger.info("broker accounts: service role and default access set")
        admin = clients.get(self.broker.username) if self.broker.username else None
        if admin is None or SERVICE_ROLE in admin.roles:
            self._gave_own_role = False
            return
        if self._gave_own_role:
            raise DynsecUnavailable(
                f"could not give the {SERVICE_ROLE} role to {admin.username} "
                "(is it a dynsec admin?)"
            )
        self._gave_own_role = True
        logger.info(
            "broker accounts: giving the %s role to %s (the broker disconnects it for that)",
            SERVICE_ROLE,
            admin.username,
        )
        command = {"command": "addClientRole", "username": admin.username}
        await control.execute_and_drop([{**command, "rolename": SERVICE_ROLE}])
        raise OwnRoleChanged

    async def _apply(self, control: DynsecControl, changes: Sequence[DeviceChange]) -> _PassCounts:
        """Send the changes in measured messages; record each message's successes at once, so
        a pass cut short (lost connection) is not done again."""
        counts = _PassCounts()
        position = 0
        while position < len(changes):
            batch: list[DeviceChange] = []
            size = 0
            while position < len(changes) and (not batch or size < self._sizer.size):
                batch.append(changes[position])
                size += len(changes[position].commands)
                position += 1
            commands = [command for change in batch for command in change.commands]
            sent_at = time.monotonic()
            results = await control.execute(commands)
            self._sizer.observe(len(commands), time.monotonic() - sent_at)
            applied = self._count(batch, results, counts)
            if applied:
                await self.source.mark_applied(applied)
        return counts

    def _count(
        self, batch: Sequence[DeviceChange], results: Sequence[CommandResult], counts: _PassCounts
    ) -> dict[str, str]:
        applied: dict[str, str] = {}
        offset = 0
        for change in batch:
            mine = results[offset : offset + len(change.commands)]
            offset += len(change.commands)
            failures = [result for result in mine if not succeeded(result)]
            if failures:
                counts.failed += 1
                # Errors name the device and the command, never a password.
                counts.errors.append(
                    f"{change.device_id}: {failures[0].command}: {failures[0].error}"
                )
                continue
            if change.kind in ("delete", "cleanup"):
                counts.deleted += change.kind == "delete"
                continue
            if change.kind == "create":
                counts.created += 1
            else:
                counts.updated += 1
            if change.nonce is not None:
                applied[change.device_id] = change.nonce
        return applied

    def _record(
        self, started: float, wanted: int, on_broker: int, counts: _PassCounts, conflicts: int
    ) -> None:
        status = self.status
        status.passes += 1
        status.last_reconcile_at = datetime.now(UTC)
        status.last_duration_s = time.monotonic() - started
        status.devices_wanted = wanted
        status.devices_on_broker = on_broker + counts.created - counts.deleted
        status.created, status.updated, status.deleted = (
            counts.created,
            counts.updated,
            counts.deleted,
        )
        status.failed = counts.failed
        status.conflicts = conflicts
        status.last_error = None
        if counts.errors:
            status.last_error = f"{counts.failed} changes refused, e.g. {counts.errors[0]}"
            logger.warning(
                "broker accounts: %d changes refused by the broker: %s",
                counts.failed,
                "; ".join(counts.errors[:5]),
            )
        changed = counts.created + counts.updated + counts.deleted
        if changed or counts.failed:
            logger.info(
                "broker accounts: %d created, %d updated, %d deleted, %d refused in %.1f s",
                counts.created,
                counts.updated,
                counts.deleted,
                counts.failed,
                status.last_duration_s,
            )
