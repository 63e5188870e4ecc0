"""The one SSE client (``metalserve.bench.sse``): parsing a stream line by line, and streaming
a completion from an HTTP answer (httpx's mock transport; the end-to-end use is in
test_loadgen.py and test_bench_serve.py, against a real replica)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import pytest

from metalserve.bench import sse

CHUNK = {"choices": [{"text": "x"}], "system_fingerprint": "m@0123456789ab"}


def parse(lines: list[str]) -> list[dict[str, Any]]:
    parser = sse.EventParser()
    events = [e for line in lines if (e := parser.feed(line)) is not None]
    parser.end()
    return events


def test_events_in_order_up_to_done() -> None:
    lines = [
        ": a comment",
        "event: completion",
        f"data: {json.dumps(CHUNK)}",
        "",
        'data:{"choices": [], "usage": {"completion_tokens": 1}}',  # no space after the colon
        "",
        "data: [DONE]",
        "",
    ]
    assert parse(lines) == [CHUNK, {"choices": [], "usage": {"completion_tokens": 1}}]


@pytest.mark.parametrize(
    ("lines", "error", "reason"),
    [
        (["data: {not json"], sse.MalformedEvent, "malformed event"),
        (["data: [1, 2]"], sse.MalformedEvent, "malformed event"),
        (
            ['data: {"error": {"message": "generation failed", "type": "server_error"}}'],
            sse.ErrorEvent,
            "stream error: generation failed",
        ),
        (['data: {"error": "plain"}'], sse.ErrorEvent, "stream error: plain"),
        (["data: [DONE]", f"data: {json.dumps(CHUNK)}"], sse.DataAfterDone, "data after [DONE]"),
        ([f"data: {json.dumps(CHUNK)}"], sse.EndedBeforeDone, "stream ended before [DONE]"),
        ([], sse.EndedBeforeDone, "stream ended before [DONE]"),
    ],
)
def test_protocol_errors(lines: list[str], error: type[sse.StreamError], reason: str) -> None:
    with pytest.raises(error) as caught:
        parse(lines)
    assert caught.value.reason == reason
    assert isinstance(caught.value, sse.StreamError)


def test_error_event_keeps_the_error_object() -> None:
    parser = sse.EventParser()
    with pytest.raises(sse.ErrorEvent) as caught:
        parser.feed('data: {"error": {"message": "boom", "code": "x"}}')
    assert caught.value.error == {"message": "boom", "code": "x"}
    assert caught.value.message == "boom"
    assert sse.error_message({"choices": []}) is None


def collect(
    body: bytes, status: int = 200, *, read_past_done: bool = False
) -> tuple[list[dict[str, Any]], list[str]]:
    """Stream through httpx from a mock answer; returns the events and what was requested."""
    requested: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requested.append(f"{request.method} {request.url.path} {json.loads(request.content)}")
        return httpx.Response(status, content=body)

    async def run() -> list[dict[str, Any]]:
        transport = httpx.MockTransport(answer)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            stream = sse.events(client, "/v1/completions", {"a": 1}, read_past_done=read_past_done)
            async with contextlib.aclosing(stream) as events:
                return [event async for event in events]

    return asyncio.run(run()), requested


def test_events_over_http() -> None:
    body = f"data: {json.dumps(CHUNK)}\n\ndata: [DONE]\n\n".encode()
    events, requested = collect(body)
    assert events == [CHUNK]
    assert requested == ["POST /v1/completions {'a': 1}"]


def test_stops_at_done_unless_told_to_read_on() -> None:
    body = f"data: [DONE]\n\ndata: {json.dumps(CHUNK)}\n\n".encode()
    assert collect(body)[0] == []  # bench serve and the checks: closed at [DONE]
    with pytest.raises(sse.DataAfterDone):  # the load generator reads to the end
        collect(body, read_past_done=True)


def test_http_status_error_carries_the_body() -> None:
    with pytest.raises(sse.HTTPStatusError) as caught:
        collect(b"<html>No server is available</html>", 503)
    assert caught.value.status == 503
    assert caught.value.body == b"<html>No server is available</html>"
    assert caught.value.reason == "http 503"


def test_cut_stream_over_http() -> None:
    with pytest.raises(sse.EndedBeforeDone):
        collect(f"data: {json.dumps(CHUNK)}\n\n".encode())
