"""uvicorn's HTTP protocol with a deadline for each request's head (a slowloris defence).

uvicorn has no such timeout (its issue #157 has asked for one since 2018): `timeout_keep_alive`
only covers the idle time between requests, so a client that trickles a request head one byte
at a time holds its connection, and enough of them hold every connection the process can take
(500 such connections were all still open after 70 s before this). Here a request's head must
arrive whole within `header_timeout_s`, counted from the connection's start for its first
request and from the first byte of each later one, as Go's `ReadHeaderTimeout` and hyper's
`header_read_timeout` do; a late one gets its connection closed. Bodies and responses are not
limited by it (the body's size is, by the app).

`iotmeter serve` uses it; with uvicorn's own command line pass
`--http iotmeter.server:HttpProtocol`. The app sets the deadline from
`IOTMETER_HTTP_HEADER_TIMEOUT_S` when it is created.

It also ends the app's open event streams when the server shuts down (`on_shutdown`): uvicorn
waits for every response in progress before it stops, and an event stream never ends on its
own, so one open dashboard tab kept a SIGTERMed server running until it was killed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

_shutdown_hooks: list[Callable[[], None]] = []


@contextmanager
def on_shutdown(hook: Callable[[], None]) -> Iterator[None]:
    """Call `hook` (maybe several times) when the server starts shutting down, while inside."""
    _shutdown_hooks.append(hook)
    try:
        yield
    finally:
        _shutdown_hooks.remove(hook)


class HttpProtocol(HttpToolsProtocol):
    header_timeout_s: ClassVar[float] = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        for hook in list(_shutdown_hooks):
            hook()
        super().shutdown()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._head_timer = asyncio.get_running_loop().call_later(
            self.header_timeout_s, self._head_late
        )

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            logger.debug("closing a connection whose request head is late: %s", self.client)
            self.transport.close()
