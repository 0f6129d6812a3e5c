"""Which MQTT broker to use, and the embedded (in-process, amqtt) one for zero-config runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from iotmeter.config import Settings, env_name
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


def _embedded_config(host: str, port: int) -> dict[str, Any]:
    # Listeners and plugins are given explicitly: amqtt's defaults bind 0.0.0.0 and load
    # logging and $SYS plugins.
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


@contextlib.asynccontextmanager
async def embedded_broker(host: str, port: int) -> AsyncIterator[BrokerAddress]:
    """Run an amqtt broker in this process for the duration of the block."""
    from amqtt.broker import Broker
    from amqtt.errors import BrokerError

    broker = Broker(_embedded_config(host, port))
    try:
        await broker.start()
    except BrokerError as exc:
        raise SettingsInvalid(
            f"cannot start the embedded MQTT broker on {host}:{port} ({exc}); free the port, "
            f"or set {env_name('mqtt_embedded_port')} to another one, or point "
            f"{env_name('mqtt_url')} at a running broker"
        ) from exc
    logger.info("embedded MQTT broker listening on %s:%d", host, port)
    try:
        yield BrokerAddress(host=host, port=port, origin="embedded")
    finally:
        await broker.shutdown()
        logger.info("embedded MQTT broker stopped")


@contextlib.asynccontextmanager
async def open_broker(settings: Settings) -> AsyncIterator[BrokerAddress]:
    """The broker the collector and simulator use: configured, found locally, or embedded."""
    host, port = settings.mqtt_embedded_host, settings.mqtt_embedded_port
    if settings.mqtt_url not in ("auto", "embedded"):
        address = BrokerAddress.from_url(settings.mqtt_url)
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
    async with embedded_broker(host, port) as address:
        yield address
