"""uvicorn's HTTP/1.1 protocol (httptools) with a bound on how long a client may take to send a
request.

uvicorn waits for a request's head and body as long as the client likes: its keep-alive timer
runs only between requests and any byte received cancels it, so a client that opens a
connection and sends nothing, or one byte every few seconds, holds it forever (a replica
reached directly, without HAProxy's ``timeout http-request`` in front). Here a timer starts
when the connection opens and again when a response ends; the whole next request must arrive
before it fires, or the client gets 408 (nothing received yet, or only part of the head) or the
connection closes (the head is in and the body is late: the handler sees a disconnect).

httptools, not h11: per streamed token it costs the event loop ~20% less CPU (BENCHMARKS, round
2 step 15).

Each request's scope also carries when its head was parsed (``RECEIVED``): the API middleware
times the request from there, and how long it waited for the event loop to begin handling it
(in a wave of requests, the later ones wait for the earlier ones' Python; on a pipelined
connection, for the responses ahead of it). Not seen: how long its bytes sat in the socket
before the loop read them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

# The ASGI scope's key of the request's arrival: time.perf_counter() when its head was parsed.
RECEIVED = "metalserve.received"
REQUEST_TIMEOUT_BODY = b"request not received in time\n"
# Written by hand: the parser has no request to answer yet.
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(REQUEST_TIMEOUT_BODY), REQUEST_TIMEOUT_BODY)
)


def timed_http_protocol(request_timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with this bound in seconds."""

    class TimedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._request_timer: asyncio.TimerHandle | None = None
            self._receiving = False  # a request begun and not wholly in
            self._head_in = False  # ... and its head parsed

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._receiving, self._head_in = True, False

        def on_headers_complete(self) -> None:
            self._head_in = True
            # Its head is in: from here it waits only for the server (a slow client's head
            # is the request timeout's business, not the loop's).
            self.scope[RECEIVED] = time.perf_counter()  # type: ignore[literal-required]
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._receiving = False
            answered = self.cycle is not None and self.cycle.response_complete
            super().on_message_complete()
            if answered and not self.transport.is_closing():
                self._arm()  # answered before its body was in (a 404): bound the next one
            else:
                self._disarm()  # the whole request is in

        def on_response_complete(self) -> None:
            # The next request gets the same bound, unless it is wholly in already (pipelined):
            # looked at before uvicorn starts it (and takes it off the pipeline).
            bound_next = self._receiving or not self.pipeline
            super().on_response_complete()
            if not self.transport.is_closing() and bound_next:
                self._arm()

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
            if not (self._receiving and self._head_in):
                log.warning("%s sent no whole request in %.1fs: 408", client, request_timeout)
                self.transport.write(REQUEST_TIMEOUT_RESPONSE)
            else:
                log.warning("%s sent no whole body in %.1fs: closing", client, request_timeout)
            self.transport.close()

    return TimedHttpProtocol
