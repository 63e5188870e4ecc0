"""The one client of streamed completions (Server-Sent Events over httpx): used by the load
generator, ``bench serve`` and the reload check.

A stream is a ``text/event-stream`` body of ``data: <json>`` lines ending with ``data: [DONE]``.
:func:`events` yields every JSON event in order and raises a :class:`StreamError` naming what
went wrong: an HTTP status other than 200, an event that is not a JSON object, an event holding
an ``error`` object, data after ``[DONE]`` (only when reading on past it), or an end of the body
before ``[DONE]``. Transport errors and timeouts are httpx's own exceptions.

Why not the ``openai`` client: the load generator counts failures by kind (``ConnectError``,
``http 503``, ``stream ended before [DONE]``, ...: its summary's keys), which the openai client
folds into its own exception types and cannot see at all for a stream cut before ``[DONE]``; it
also parses every chunk into pydantic models, client work inside the time to first token and
request latency that ``bench serve`` measures. httpx is already what the replica's other clients
use, and it runs on hosts without the serving stack.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

import httpx

DONE = "[DONE]"
SNIPPET = 200  # characters of a bad event quoted in an error


class StreamError(Exception):
    """A stream that broke the protocol: ``reason`` is short (for counting), ``detail`` longer."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason


class HTTPStatusError(StreamError):
    """The answer's status was not 200; ``body`` is the whole answer."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"http {status}", f"http {status}: {body[:SNIPPET]!r}")
        self.status = status
        self.body = body


class MalformedEvent(StreamError):
    def __init__(self, data: str) -> None:
        super().__init__("malformed event", f"malformed event: {data[:SNIPPET]!r}")


class ErrorEvent(StreamError):
    """An event with an ``error`` object: the server failed the request mid-stream."""

    def __init__(self, event: dict[str, Any]) -> None:
        self.error = event["error"]
        self.message = error_message(event) or ""
        super().__init__(f"stream error: {self.message}")


class DataAfterDone(StreamError):
    def __init__(self, data: str) -> None:
        super().__init__("data after [DONE]", f"data after [DONE]: {data[:SNIPPET]!r}")


class EndedBeforeDone(StreamError):
    def __init__(self) -> None:
        super().__init__("stream ended before [DONE]")


def error_message(payload: object) -> str | None:
    """The ``error.message`` of an OpenAI-style error object (or the error itself as text)."""
    if isinstance(payload, dict) and "error" in payload:
        error = payload["error"]
        message = error.get("message") if isinstance(error, dict) else error
        return str(message)
    return None


class EventParser:
    """The events of a stream, one line at a time (what :func:`events` runs on)."""

    def __init__(self) -> None:
        self.done = False

    def feed(self, line: str) -> dict[str, Any] | None:
        """The event of a ``data:`` line; None for anything else (blank separators, comments,
        ``event:``/``id:`` fields, and ``[DONE]``, which sets :attr:`done`)."""
        if not line.startswith("data:"):
            return None
        data = line[len("data:") :].strip()
        if data == DONE:
            self.done = True
            return None
        if self.done:
            raise DataAfterDone(data)
        try:
            event = json.loads(data)
        except ValueError:
            raise MalformedEvent(data) from None
        if not isinstance(event, dict):
            raise MalformedEvent(data)
        if "error" in event:
            raise ErrorEvent(event)
        return event

    def end(self) -> None:
        """The body ended: it must have said ``[DONE]``."""
        if not self.done:
            raise EndedBeforeDone


async def events(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    *,
    read_past_done: bool = False,
    on_head: Callable[[], None] | None = None,
) -> AsyncGenerator[dict[str, Any], None]:
    """POST ``body`` to ``url`` and yield the stream's events (``on_head``: called once the
    response's head is in).

    At ``[DONE]`` the response is closed at once, unless ``read_past_done``: then the body is
    read to its end and any data after ``[DONE]`` is an error (the load generator's check).
    Use it under ``contextlib.aclosing`` so that a consumer that stops early closes the response.
    """
    parser = EventParser()
    async with client.stream("POST", url, json=body) as response:
        if on_head is not None:
            on_head()
        if response.status_code != 200:
            raise HTTPStatusError(response.status_code, await response.aread())
        async for line in response.aiter_lines():
            event = parser.feed(line)
            if event is not None:
                yield event
            elif parser.done and not read_past_done:
                break
    parser.end()
