"""Which MQTT broker to use, and the embedded (in-process, amqtt) one for zero-config runs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography import x509

from iotmeter.config import Settings, env_name
from iotmeter.devicelink.amqtt_plugin import (
    CredentialCheck,
    DeviceAccess,
    access_plugins,
    guarded_broker,
)
from iotmeter.devicelink.credentials import SERVICE_USERNAME, service_password
from iotmeter.errors import SettingsInvalid

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    origin: str = "configured"
    """`configured` (a URL), `local` (found answering on the auto address) or `embedded`."""
    ca_file: str | None = None
    """CA certificate the broker's TLS certificate is verified against (None: the system's)."""

    def tls_context(self) -> ssl.SSLContext | None:
        """The client TLS context for an `mqtts://` broker, else None. Reads files: call it
        once at start-up (or in a thread)."""
        return ssl.create_default_context(cafile=self.ca_file) if self.tls else None

    @classmethod
    def from_url(cls, url: str, origin: str = "configured") -> BrokerAddress:
        """Parse `mqtt[s]://[user:pass@]host[:port]` (credentials may be percent-escaped)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp") or not parts.hostname:
            raise ValueError(f"not a broker URL like mqtt://user:password@host:1883: {url!r}")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=tls,
            origin=origin,
        )

    @property
    def url(self) -> str:
        """The broker's URL with credentials (for clients in this process)."""
        credentials = ""
        if self.username:
            credentials = self.username + (f":{self.password}" if self.password else "") + "@"
        return f"{'mqtts' if self.tls else 'mqtt'}://{credentials}{self.host}:{self.port}"

    def describe(self) -> str:
        """Where it is, without credentials (for logs and the API)."""
        return f"{self.origin} broker at {self.host}:{self.port}"


async def _answers(host: str, port: int) -> bool:
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), PROBE_TIMEOUT_S
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@dataclass(frozen=True)
class EmbeddedTls:
    """The embedded broker's MQTT-over-TLS listener."""

    port: int
    cert_file: Path
    key_file: Path
    device_ca_file: Path | None = None
    """Client certificates are optional; one presented must be signed by this CA."""


def _listener(kind: str, host: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "bind": f"{host}:{port}", **extra}


def _embedded_config(
    host: str,
    port: int,
    *,
    ws_port: int = 0,
    tls: EmbeddedTls | None = None,
    access: DeviceAccess | None = None,
) -> dict[str, Any]:
    # Listeners and plugins are given explicitly: amqtt's defaults bind 0.0.0.0 and load
    # logging and $SYS plugins. amqtt copies each unset field of a listener from `default`:
    # `default` stays the plain one, so nothing of TLS leaks into another listener.
    listeners = {"default": _listener("tcp", host, port)}
    if ws_port:
        listeners["ws"] = _listener("ws", host, ws_port)
    if tls is not None:
        # amqtt asks for client certificates (CERT_OPTIONAL) and trusts `cafile` alone when
        # one is given; without one it would trust the system's CAs, which DeviceAccess ignores.
        extra: dict[str, Any] = {"ssl": True, "certfile": tls.cert_file, "keyfile": tls.key_file}
        if tls.device_ca_file is not None:
            extra["cafile"] = tls.device_ca_file
        listeners["tls"] = _listener("tcp", host, tls.port, **extra)
    plugins: dict[str, Any] = (
        {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        if access is None
        else access_plugins(access)
    )
    return {"listeners": listeners, "plugins": plugins}


def _check_tls_files(tls: EmbeddedTls) -> None:
    """Load the TLS files as amqtt will, so a bad one is named by its setting."""
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsInvalid(
            f"cannot use {env_name('mqtt_embedded_tls_cert_file')}={tls.cert_file} with "
            f"{env_name('mqtt_embedded_tls_key_file')}={tls.key_file} for the embedded MQTT "
            f"broker's TLS listener: {exc}"
        ) from exc
    if tls.device_ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.device_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsInvalid(
                f"cannot read {env_name('device_ca_cert_file')}={tls.device_ca_file} "
                f"(a PEM CA certificate): {exc}"
            ) from exc


def _check_distinct(ports: dict[str, int]) -> None:
    first_setting: dict[int, str] = {}
    for setting, port in ports.items():
        if port in first_setting:
            raise SettingsInvalid(
                f"{env_name(first_setting[port])} and {env_name(setting)} are both {port}: "
                "each listener of the embedded MQTT broker needs its own port"
            )
        first_setting[port] = setting


async def _check_port(host: str, port: int, setting: str) -> None:
    """Bind the port as amqtt will and let go, so a taken one is named by its setting.

    amqtt starts its listeners one after another and leaves the ones already open running
    when a later one fails (and refuses `shutdown()` then): finding a taken port first keeps
    that to the rare race with another process.
    """
    try:
        server = await asyncio.get_running_loop().create_server(
            asyncio.Protocol, host, port, reuse_address=True
        )
    except OSError as exc:
        raise _start_failed(f"{host}:{port}", [setting], exc) from exc
    server.close()
    await server.wait_closed()


def _start_failed(where: str, settings: list[str], exc: Exception) -> SettingsInvalid:
    names = " or ".join(env_name(setting) for setting in settings)
    return SettingsInvalid(
        f"cannot start the embedded MQTT broker on {where} ({exc}); free the port, "
        f"or set {names} to another one, or point {env_name('mqtt_url')} at a running broker"
    )


@contextlib.asynccontextmanager
async def embedded_broker(
    host: str,
    port: int,
    *,
    ws_port: int = 0,
    tls: EmbeddedTls | None = None,
    access: DeviceAccess | None = None,
) -> AsyncIterator[BrokerAddress]:
    """Run an amqtt broker in this process for the duration of the block.

    With `access`, clients must authenticate (`iotmeter.devicelink.amqtt_plugin`) and the
    address carries the service account for this process's own clients; without it anyone may
    connect and do anything.
    """
    from amqtt.broker import Broker
    from amqtt.errors import BrokerError

    ports = {"mqtt_embedded_port": port}
    if ws_port:
        ports["mqtt_embedded_ws_port"] = ws_port
    if tls is not None:
        await asyncio.to_thread(_check_tls_files, tls)
        ports["mqtt_embedded_tls_port"] = tls.port
    _check_distinct(ports)
    for setting, setting_port in ports.items():
        await _check_port(host, setting_port, setting)

    config = _embedded_config(host, port, ws_port=ws_port, tls=tls, access=access)
    broker = Broker(config) if access is None else guarded_broker(config, access)
    if access is not None:
        # amqtt 0.12.1 iterates its subscription table while awaiting the topic plugins (one
        # await per subscriber of each message); a device subscribing or leaving meanwhile
        # raises "dictionary changed size during iteration" in that broadcast, and the message
        # never reaches the subscribers after it (the collector among them). Iterating a copy
        # closes the window. (A private attribute: amqtt is pinned below 0.13, and
        # tests/integration/test_embedded_broker_auth.py breaks if this stops working.)
        broker._subscriptions = _SubscriptionTable()
    try:
        await broker.start()
    except BrokerError as exc:
        # Another process took a port since the check above.
        raise _start_failed(host, list(ports), exc) from exc
    logger.info(
        "embedded MQTT broker listening on %s:%d%s%s (%s)",
        host,
        port,
        f", WebSocket :{ws_port}" if ws_port else "",
        f", TLS :{tls.port}" if tls is not None else "",
        "device authentication on" if access is not None else "anonymous clients allowed",
    )
    try:
        yield BrokerAddress(
            host=host,
            port=port,
            username=SERVICE_USERNAME if access is not None else None,
            password=access.service_password if access is not None else None,
            origin="embedded",
        )
    finally:
        await broker.shutdown()
        logger.info("embedded MQTT broker stopped")


class _SubscriptionTable(dict[str, Any]):
    """amqtt's topic filter -> subscribers table, whose `items()` is a copy (see above)."""

    def items(self) -> Any:
        return list(super().items())

    def __iter__(self) -> Any:
        # The same at every connect: amqtt walks the filters, awaiting for each.
        return iter(list(super().__iter__()))


async def _load_device_cas(path: Path) -> list[x509.Certificate]:
    """The CA certificates in the file (more than one while a CA is being replaced)."""
    try:
        return x509.load_pem_x509_certificates(await asyncio.to_thread(path.read_bytes))
    except (OSError, ValueError) as exc:
        raise SettingsInvalid(
            f"cannot read {env_name('device_ca_cert_file')}={path} (a PEM CA certificate): {exc}"
        ) from exc


def _warn_about_bind_address(settings: Settings) -> None:
    if settings.embedded_broker_is_local:
        return
    host = settings.mqtt_embedded_host
    if settings.mqtt_device_auth is None:
        logger.warning(
            "the embedded MQTT broker listens on %s (not loopback), so device authentication "
            "is on: devices connect with their own credentials and reach only their own "
            "topics. To let any client in, set %s=false",
            host,
            env_name("mqtt_device_auth"),
        )
    elif not settings.mqtt_device_auth:
        logger.warning(
            "the embedded MQTT broker listens on %s (not loopback) with device authentication "
            "off (%s=false): any client that reaches it may connect without credentials and "
            "publish or subscribe to every topic",
            host,
            env_name("mqtt_device_auth"),
        )


@contextlib.asynccontextmanager
async def open_broker(
    settings: Settings,
    check: CredentialCheck | None = None,
    service_secret: bytes | None = None,
) -> AsyncIterator[BrokerAddress]:
    """The broker the collector and simulator use: configured, found locally, or embedded.

    When the embedded broker runs with device authentication (`Settings.device_auth`), `check`
    (the device registry) and `service_secret` (the credential secret) are required.
    """
    host, port = settings.mqtt_embedded_host, settings.mqtt_embedded_port
    if settings.mqtt_url not in ("auto", "embedded"):
        address = BrokerAddress.from_url(settings.mqtt_url)
        if settings.mqtt_ca_file is not None:
            address = dataclasses.replace(address, ca_file=str(settings.mqtt_ca_file))
        logger.info("MQTT: using the %s", address.describe())
        yield address
        return
    if settings.mqtt_url == "auto" and await _answers(host, port):
        address = BrokerAddress(host=host, port=port, origin="local")
        logger.info(
            "MQTT: a broker answers on %s:%d, using it (%s=auto)", host, port, env_name("mqtt_url")
        )
        yield address
        return
    if settings.mqtt_url == "auto":
        logger.info("MQTT: no broker answers on %s:%d, starting the embedded one", host, port)
    _warn_about_bind_address(settings)
    tls = None
    cert_file, key_file = settings.mqtt_embedded_tls_cert_file, settings.mqtt_embedded_tls_key_file
    if settings.mqtt_embedded_tls_port and cert_file is not None and key_file is not None:
        tls = EmbeddedTls(
            port=settings.mqtt_embedded_tls_port,
            cert_file=cert_file,
            key_file=key_file,
            device_ca_file=settings.device_ca_cert_file,
        )
    access = None
    if settings.device_auth:
        if check is None or service_secret is None:
            raise ValueError(
                "open_broker: the embedded broker authenticates devices "
                f"({env_name('mqtt_device_auth')}); pass `check` and `service_secret`"
            )
        device_cas: list[x509.Certificate] = []
        if tls is not None and tls.device_ca_file is not None:
            device_cas = await _load_device_cas(tls.device_ca_file)
        access = DeviceAccess(check, service_password(service_secret), device_cas)
    async with embedded_broker(
        host, port, ws_port=settings.mqtt_embedded_ws_port, tls=tls, access=access
    ) as address:
        yield address
