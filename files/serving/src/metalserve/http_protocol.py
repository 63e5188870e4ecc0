"""uvicorn's HTTP/1.1 protocol with a bound on how long a client may take to send a request.

uvicorn waits for a request's head and body as long as the client likes: its keep-alive timer
runs only between requests and any byte received cancels it, so a client that opens a
connection and sends nothing, or one byte every few seconds, holds it forever (a replica
reached directly, without HAProxy's ``timeout http-request`` in front). Here a timer starts
when the connection opens and again when a response ends; the whole next request must arrive
before it fires, or the client gets 408 (nothing received yet, or only part of the head) or the
connection closes (the head is in and the body is late: the handler sees a disconnect).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_BODY = b"request not received in time\n"
# Written by hand: h11 refuses to send a response before it has parsed a request.
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(REQUEST_TIMEOUT_BODY), REQUEST_TIMEOUT_BODY)
)


def timed_h11_protocol(request_timeout: float) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with this bound in seconds."""

    class TimedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._request_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # the whole request is in (or the connection is done)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on this connection gets the same bound

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._request_timer = self.loop.call_later(request_timeout, self._request_timed_out)

        def _disarm(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None

        def _request_timed_out(self) -> None:
            self._request_timer = None
            if self.transport.is_closing():
                return
            client = "{}:{}".format(*self.client) if self.client else "a client"
            if self.conn.their_state is h11.IDLE:  # h11 is IDLE until a whole head is parsed
                log.warning("%s sent no whole request in %.1fs: 408", client, request_timeout)
                self.transport.write(REQUEST_TIMEOUT_RESPONSE)
            else:
                log.warning("%s sent no whole body in %.1fs: closing", client, request_timeout)
            self.transport.close()

    return TimedH11Protocol
