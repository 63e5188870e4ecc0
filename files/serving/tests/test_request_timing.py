"""A request's arrival (stamped by the replica's HTTP protocol) and what the API middleware
times from it: the wait until its handling began, and its latency."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn

from conftest import free_port
from metalserve.api.middleware import ObservabilityMiddleware
from metalserve.http_protocol import timed_http_protocol
from metalserve.metrics import Metrics

SLOW_SECONDS = 0.3


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/slow`` answers after SLOW_SECONDS, anything else at once."""
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW_SECONDS)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def served() -> Iterator[tuple[int, Metrics]]:
    """The middleware in front of ``_app`` on uvicorn with the replica's protocol, in a thread."""
    metrics = Metrics()
    replica = SimpleNamespace(
        metrics=metrics, tracing=None, settings=SimpleNamespace(access_log=False)
    )
    port = free_port()
    config = uvicorn.Config(
        ObservabilityMiddleware(_app, replica),  # type: ignore[arg-type]
        host="127.0.0.1",
        port=port,
        http=timed_http_protocol(10.0),
        lifespan="off",
        log_config=None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    yield port, metrics
    server.should_exit = True
    thread.join(10)


def test_a_request_is_timed_from_its_arrival_not_from_its_handling(
    served: tuple[int, Metrics],
) -> None:
    """Two requests in one write on one connection (pipelined): both arrive at once, the second
    is handled once the first (slow) one is answered: it waited about SLOW_SECONDS for its
    handling to begin, and its latency counts that wait."""
    port, metrics = served
    pipelined = b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\nGET /fast HTTP/1.1\r\nhost: t\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(pipelined)
        received = b""
        while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = client.recv(65536)
            assert chunk, f"the connection closed after {received!r}"
            received += chunk

    def sample(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    delay = "metalserve_request_start_delay_seconds_bucket"
    assert sample("metalserve_request_start_delay_seconds_count") == 2
    assert sample(delay, le="0.1") == 1, "the first began at once"
    assert sample(delay, le="0.5") == 2, "the second waited for the first's answer"
    assert sample("metalserve_request_start_delay_seconds_sum") >= SLOW_SECONDS * 0.9
    # Both latencies count from the arrival: each about SLOW_SECONDS.
    latency = "metalserve_request_duration_seconds_bucket"
    assert sample(latency, endpoint="unmatched", le="0.25") == 0
