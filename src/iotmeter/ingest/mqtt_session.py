"""One MQTT connection on the asyncio event loop, through paho's documented external-loop API.

aiomqtt acknowledges a QoS 1 message as soon as it is queued (it has no manual acknowledgement:
aiomqtt issue #345), while iotmeter may acknowledge only what its spool has made durable. So the
intake drives paho directly, as paho documents for an external event loop: `socket()`,
`loop_read()`, `loop_write()`, `loop_misc()`, the socket open/close/register-write callbacks,
`manual_ack_set()` and `ack()`. Nothing here touches a private attribute of paho.

paho connects with a blocking call (DNS, TCP, TLS handshake): it runs on a daemon thread of its
own, so a shutdown never waits for it (a thread of the default executor would hold the process
open until the connect timed out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from iotmeter.ingest.broker import BrokerAddress

logger = logging.getLogger(__name__)

MISC_INTERVAL_S = 1.0
"""How often paho's keepalive bookkeeping runs (it sends PINGREQ and notices a dead link)."""
_READS_PER_WAKEUP = 512
"""Packets read per readiness callback at most, so other work on the loop gets its turn."""


class SessionClosed(Exception):
    """The connection is gone (or could not be made); the message says why."""

    def __init__(self, message: str, *, by_broker: bool = False) -> None:
        super().__init__(message)
        self.by_broker = by_broker
        """True when the broker (or the network) ended a connection that was up."""


MessageHandler = Callable[[paho.MQTTMessage], None]


class PahoSession:
    """A persistent-session (clean_session=False) MQTT 3.1.1 connection with manual PUBACKs."""

    def __init__(
        self,
        broker: BrokerAddress,
        client_id: str,
        on_message: MessageHandler,
        *,
        keepalive: int = 10,
        connect_timeout: float = 10.0,
    ) -> None:
        self.broker = broker
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.messages = 0
        """PUBLISH packets handed to `on_message` so far."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._handler = on_message
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,
        )
        self._client.connect_timeout = connect_timeout
        self._client.manual_ack_set(True)
        if broker.username is not None:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            self._client.tls_set_context(ssl.create_default_context())
        if not logger.isEnabledFor(logging.DEBUG):
            # paho formats a debug line per packet otherwise; our own logs say what matters.
            self._client.disable_logger()
        else:
            self._client.enable_logger(logger)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_socket_open = self._on_socket_open
        self._client.on_socket_close = self._on_socket_close
        self._client.on_socket_register_write = self._on_register_write
        self._client.on_socket_unregister_write = self._on_unregister_write
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self._suback: dict[int, asyncio.Future[None]] = {}
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._fd: int | None = None
        self._reading = False
        self._paused = False
        self._misc: asyncio.TimerHandle | None = None
        self._closed = False
        self.up_since: float | None = None

    # --- life cycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection and wait for the broker's CONNACK; `SessionClosed` if not."""
        done: asyncio.Future[None] = self._loop.create_future()
        client, loop = self._client, self._loop
        broker, keepalive = self.broker, self.keepalive

        def connect_in_thread() -> None:
            try:
                client.connect(broker.host, broker.port, keepalive)
            except BaseException as exc:  # reported to the loop, never lost in the thread
                error: BaseException | None = exc
            else:
                error = None
            with contextlib.suppress(RuntimeError):  # the loop has gone: nothing to tell
                loop.call_soon_threadsafe(_settle, done, error)

        threading.Thread(
            target=connect_in_thread, name="iotmeter-mqtt-connect", daemon=True
        ).start()
        try:
            async with asyncio.timeout(self.connect_timeout + 1):
                await done
                await self._connack
        except TimeoutError:
            raise SessionClosed(
                f"no answer from the broker within {self.connect_timeout:g} s"
            ) from None
        except SessionClosed:
            raise
        except Exception as exc:
            raise SessionClosed(_describe(exc)) from exc
        finally:
            if not (done.done() and self._connack.done() and self._connack.exception() is None):
                # Cancelled or failed: a connect still running in its thread is closed when it
                # finishes (its socket must not stay open behind our back).
                done.add_done_callback(self._close_after_connect)
        self.up_since = time.monotonic()
        self._schedule_misc()

    async def subscribe(self, topic: str, qos: int) -> None:
        """Subscribe and wait for the SUBACK; `SessionClosed` when the broker refuses."""
        result, mid = self._client.subscribe(topic, qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise SessionClosed(f"cannot subscribe to {topic}: {paho.error_string(result)}")
        acknowledged: asyncio.Future[None] = self._loop.create_future()
        self._suback[mid] = acknowledged
        try:
            async with asyncio.timeout(self.connect_timeout):
                await asyncio.wait({acknowledged, self._lost}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise SessionClosed(f"no SUBACK within {self.connect_timeout:g} s") from None
        if self._lost.done():
            self._lost.result()
        acknowledged.result()

    async def wait_closed(self) -> None:
        """Return never; raise `SessionClosed` once the connection is lost."""
        await asyncio.shield(self._lost)
        raise SessionClosed("connection closed")

    def _close_after_connect(self, connect: asyncio.Future[None]) -> None:
        if not connect.cancelled():
            connect.exception()  # retrieved: the caller was told already, or has gone
        self.close()

    def close(self) -> None:
        """Send DISCONNECT if possible and close the socket (never blocks)."""
        if self._closed:
            return
        self._closed = True
        if self._misc is not None:
            self._misc.cancel()
        with contextlib.suppress(Exception):
            if self._client.is_connected():
                self._client.disconnect()
                self._client.loop_write()
        sock = self._client.socket()
        if sock is not None:
            self._forget_socket()
            with contextlib.suppress(OSError):
                sock.close()
        if not self._lost.done():
            self._lost.set_exception(SessionClosed("closed by iotmeter"))
        for future in (self._lost, self._connack):
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: nobody need wait for it any more

    @property
    def connected(self) -> bool:
        return not self._closed and not self._lost.done() and self._client.is_connected()

    # --- acknowledgement and flow control -----------------------------------------------------

    def ack(self, mid: int) -> None:
        """PUBACK a QoS 1 message (sent on the next write readiness, with the others queued)."""
        self._client.ack(mid, 1)

    def pause_reading(self) -> None:
        """Stop reading the socket: the broker keeps what it has not sent (TCP pushes back)."""
        self._paused = True
        if self._reading and self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        self._paused = False
        if not self._reading and self._fd is not None and not self._closed:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    # --- paho's callbacks ---------------------------------------------------------------------

    def _on_connect(
        self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        if self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(
                SessionClosed(f"the broker refused the connection: {reason}")
            )
        else:
            self._connack.set_result(None)

    def _on_subscribe(
        self, _client: Any, _userdata: Any, mid: int, reasons: Any, _properties: Any
    ) -> None:
        future = self._suback.pop(mid, None)
        if future is None or future.done():
            return
        refused = [reason for reason in reasons if reason.is_failure]
        if refused:
            future.set_exception(
                SessionClosed(f"the broker refused the subscription: {refused[0]}")
            )
        else:
            future.set_result(None)

    def _on_disconnect(
        self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        if not self._lost.done():
            self._lost.set_exception(SessionClosed(f"connection lost: {reason}", by_broker=True))
        if not self._connack.done():
            self._connack.set_exception(SessionClosed(f"connection lost: {reason}"))

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        self.messages += 1
        try:
            self._handler(message)
        except Exception:
            # Never into paho (it would drop the connection); the message stays unacked and
            # the broker sends it again on the next connection.
            logger.exception("the MQTT message handler failed")

    def _on_socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch, sock.fileno())

    def _on_socket_close(self, _client: Any, _userdata: Any, _sock: Any) -> None:
        self._in_loop(self._forget_socket)

    def _on_register_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch_write, sock.fileno())

    def _on_unregister_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self._in_loop(self._unwatch_write, sock.fileno())

    # --- the event loop's side ----------------------------------------------------------------

    def _in_loop(self, function: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            function(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(function, *args)

    def _watch(self, fd: int) -> None:
        if self._closed:
            return
        self._fd = fd
        if not self._paused:
            self._loop.add_reader(fd, self._on_readable)
            self._reading = True

    def _forget_socket(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._fd = None
        self._reading = False

    def _watch_write(self, fd: int) -> None:
        if not self._closed and fd == self._fd:
            self._loop.add_writer(fd, self._on_writable)

    def _unwatch_write(self, fd: int) -> None:
        if fd == self._fd:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(fd)

    def _on_readable(self) -> None:
        client = self._client
        sock = client.socket()
        for _ in range(_READS_PER_WAKEUP):
            seen = self.messages
            if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS or self._paused:
                return
            # Nothing more arrived (or only a small packet): epoll calls again when more bytes
            # come. TLS may hold decrypted bytes that the socket no longer shows.
            if self.messages == seen and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                return

    def _on_writable(self) -> None:
        self._client.loop_write()

    def _schedule_misc(self) -> None:
        if self._closed:
            return
        self._client.loop_misc()
        self._misc = self._loop.call_later(MISC_INTERVAL_S, self._schedule_misc)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
