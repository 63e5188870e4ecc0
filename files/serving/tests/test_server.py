"""Process-level behaviour: readiness while loading, client disconnects, SIGTERM drain.

These servers run with --debug-step-delay so that a generation lasts long enough to observe.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL, Server, Store, free_port, serve_args, wait_all_ready

pytestmark = pytest.mark.e2e

STEP_DELAY = 0.05
REQUEST_TIMEOUT = 2.0
METRICS_PORT = free_port()
LONG = {"model": MODEL, "prompt": "Hi", "max_tokens": 60, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def slow_servers(
    model_store: Store, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    logs = tmp_path_factory.mktemp("slow-logs")

    def slow(drain_timeout: int, log: str, **flags: float | str) -> Server:
        args = serve_args(
            model_store,
            debug_step_delay=STEP_DELAY,
            max_new_tokens=100,
            drain_timeout=drain_timeout,
            **flags,
        )
        return Server(args, logs / log).start()

    started = {
        "patient": slow(
            30,
            "patient.log",
            request_timeout=REQUEST_TIMEOUT,
            metrics_port=METRICS_PORT,
            log_format="json",
        ),
        "impatient": slow(1, "impatient.log"),
    }
    try:
        wait_all_ready(*started.values())
        yield started
    finally:
        for server in started.values():
            server.stop()


def sample(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def test_readiness_is_503_until_loaded_and_warmed_up(slow_servers: dict[str, Server]) -> None:
    for server in slow_servers.values():
        seen = [status for _, status in server.readiness if status is not None]
        assert seen[0] == 503, server.readiness[:5]
        assert seen[-1] == 200
        # Once ready it stays ready: no flapping during start-up.
        assert seen == [503] * seen.index(200) + [200] * (len(seen) - seen.index(200))


def test_the_server_runs_on_uvloop(slow_servers: dict[str, Server]) -> None:
    """asyncio's own loop let 1% of streamed tokens wait 15-21 ms for their event under load,
    uvloop 0.9-1.5 ms (BENCHMARKS, round 2 step 15)."""
    log = slow_servers["patient"].log_path.read_text()
    assert "HTTP on the uvloop.Loop event loop" in log, log[-2000:]


def test_the_heap_is_frozen_once_ready_and_collections_are_timed(
    slow_servers: dict[str, Server],
) -> None:
    """Once ready, the server moves what start-up made into the permanent generation (full
    collections over it paused every thread for 0.2-0.7 s on the GPU machine) and times every
    collection it still makes."""
    server = slow_servers["patient"]
    wait_for(lambda: "out of garbage collection" in server.log_path.read_text(), timeout=20)
    frozen = re.search(r"froze (\d+) objects", server.log_path.read_text())
    assert frozen is not None
    assert int(frozen.group(1)) > 10_000, frozen.group(0)
    assert sample(server.url, "metalserve_gc_pause_seconds_count", generation="0") > 0


def test_client_disconnect_mid_stream_drops_the_sequence(slow_servers: dict[str, Server]) -> None:
    url = slow_servers["patient"].url
    cancelled = sample(url, "metalserve_sequences_finished_total", reason="cancelled")
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))
    # The client is gone after ~1 of 60 tokens: the engine must stop generating for it.
    wait_for(
        lambda: sample(url, "metalserve_sequences_finished_total", reason="cancelled") > cancelled
    )
    wait_for(lambda: sample(url, "metalserve_in_flight_requests") == 0)
    passes = sample(url, "metalserve_forward_passes_total", phase="decode")
    time.sleep(5 * STEP_DELAY)
    assert sample(url, "metalserve_forward_passes_total", phase="decode") == passes


def _raw_exchange(port: int, chunks: list[bytes], pause: float) -> tuple[bytes, float]:
    """Send ``chunks`` on a new connection, ``pause`` seconds apart, then read until the server
    closes; return what it sent and how long the connection lasted."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(pause)
        received = b""
        while data := sock.recv(4096):
            received += data
    return received, time.monotonic() - started


@pytest.mark.parametrize(
    ("chunks", "pause"),
    [
        pytest.param([], 0.0, id="silent"),
        # A byte every 0.5 s until 2.0 s: each one used to restart uvicorn's only timer, which
        # would then fire at 3.5 s at the earliest.
        pytest.param([b"P", b"O", b"S", b"T"], 0.5, id="trickling-head"),
    ],
)
def test_a_request_that_does_not_arrive_in_time_gets_408(
    slow_servers: dict[str, Server], chunks: list[bytes], pause: float
) -> None:
    server = slow_servers["patient"]
    received, lasted = _raw_exchange(server.port, chunks, pause)
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert REQUEST_TIMEOUT <= lasted < REQUEST_TIMEOUT + 1, lasted


def test_a_late_body_closes_the_connection_without_an_answer(
    slow_servers: dict[str, Server],
) -> None:
    server = slow_servers["patient"]
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    head += b"content-length: 100\r\n\r\n"
    received, lasted = _raw_exchange(server.port, [head, b'{"model"'], 0.1)
    assert received == b"", received
    assert REQUEST_TIMEOUT <= lasted < REQUEST_TIMEOUT + 1, lasted
    assert "sent no whole body" in server.log_path.read_text()


def test_a_slow_response_is_not_cut_and_the_next_request_is_bounded_again(
    slow_servers: dict[str, Server],
) -> None:
    """The bound covers receiving a request, not answering it: a generation longer than the
    bound completes, and the same connection then serves a second request."""
    url = slow_servers["patient"].url
    with httpx.Client(timeout=30) as client:
        for _ in range(2):
            started = time.monotonic()
            response = client.post(f"{url}/v1/completions", json=LONG)
            assert response.status_code == 200, response.text
            assert time.monotonic() - started > REQUEST_TIMEOUT  # 60 steps of 0.05 s: 3 s


def test_a_pipelined_request_is_not_cut_by_the_bound(slow_servers: dict[str, Server]) -> None:
    """Two requests in one write: the second, wholly in, runs longer than the bound after the
    first's answer; it is answered, not given a 408."""
    server = slow_servers["patient"]
    body = json.dumps(LONG).encode()  # 60 steps of 0.05 s: 3 s, longer than the bound
    first = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    second = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
    second += b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    received, lasted = _raw_exchange(server.port, [first + second + body], 0)
    assert re.findall(rb"HTTP/1.1 (\d+) ", received) == [b"200", b"200"], received[-500:]
    assert lasted > REQUEST_TIMEOUT


def test_a_request_answered_before_its_body_is_bounded_again(
    slow_servers: dict[str, Server],
) -> None:
    """A 404 goes out before the body is in; once it is, the connection is bounded as after
    any answer: nothing more within the bound gets a 408 and the close."""
    server = slow_servers["patient"]
    head = b"POST /nowhere HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\n"
    received, lasted = _raw_exchange(server.port, [head, b"body"], 0.3)
    assert received.startswith(b"HTTP/1.1 404 "), received
    assert received.count(b"HTTP/1.1 408 ") == 1, received
    assert REQUEST_TIMEOUT <= lasted < REQUEST_TIMEOUT + 1.5, lasted


def test_the_metrics_port_serves_metrics_and_nothing_else(
    slow_servers: dict[str, Server],
) -> None:
    response = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics")
    assert response.status_code == 200
    assert "metalserve_ready 1.0" in response.text
    # Other routes of the API are not there: a completion is refused, a GET gets the metrics.
    post = httpx.post(f"http://127.0.0.1:{METRICS_PORT}/v1/completions", json=LONG)
    assert post.status_code == 405, post.text
    models = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/v1/models")
    assert '"data"' not in models.text  # no model list
    assert "metalserve_ready" in models.text


def _log_entries(server: Server) -> list[dict[str, Any]]:
    lines = server.log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_the_request_id_is_kept_returned_and_logged_as_json(
    slow_servers: dict[str, Server],
) -> None:
    """HAProxy's id (X-Request-Id) comes back in the response and is on the access line, which
    a JSON log writes as fields."""
    server = slow_servers["patient"]
    given = "7F000001:C0A8_7F000001:1F90_656E0F00_0001:1A2B"  # HAProxy's unique-id-format
    short = {**LONG, "max_tokens": 2}
    headers = {"X-Request-Id": given}
    response = httpx.post(f"{server.url}/v1/completions", json=short, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == given

    def logged() -> list[dict[str, Any]]:
        return [e for e in _log_entries(server) if e.get("request_id") == given]

    wait_for(lambda: logged())
    (access,) = logged()
    assert access["logger"] == "metalserve.access"
    assert (access["method"], access["path"], access["status"]) == ("POST", "/v1/completions", 200)
    assert access["duration_s"] > 0
    assert all(e["level"] and e["time"] for e in _log_entries(server))


@pytest.mark.parametrize("given", [None, "not an id: spaces", "x" * 129])
def test_a_missing_or_implausible_request_id_is_replaced(
    slow_servers: dict[str, Server], given: str | None
) -> None:
    headers = {"X-Request-Id": given} if given is not None else {}
    response = httpx.get(f"{slow_servers['patient'].url}/version", headers=headers)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"]), response.headers


def _long_request(url: str, result: dict[str, Any]) -> None:
    with httpx.Client(timeout=60) as client:
        response = client.post(f"{url}/v1/completions", json=LONG)
    result["status"] = response.status_code
    result["body"] = response.json()


def test_sigterm_drains_in_flight_requests(slow_servers: dict[str, Server]) -> None:
    server = slow_servers["patient"]
    assert server.proc is not None
    result: dict[str, Any] = {}
    worker = threading.Thread(target=_long_request, args=(server.url, result))
    worker.start()
    wait_for(lambda: sample(server.url, "metalserve_in_flight_requests") == 1)
    time.sleep(0.3)

    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=5) as client:
        wait_for(lambda: client.get("/readyz").status_code == 503, timeout=1.0)
        assert time.monotonic() - signalled < 1.0
        assert client.get("/readyz").json()["status"] == "draining"
        assert client.get("/healthz").status_code == 200, "still alive while draining"
        refused = client.post("/v1/completions", json={**LONG, "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "draining"
        chat = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert chat.status_code == 503
    assert server.proc.poll() is None, "must not exit while a request is in flight"

    worker.join(timeout=30)
    assert result["status"] == 200
    assert result["body"]["usage"]["completion_tokens"] == 60
    assert server.proc.wait(timeout=15) == 0
    assert time.monotonic() - signalled < 30


def test_drain_timeout_aborts_and_exits_zero(slow_servers: dict[str, Server]) -> None:
    server = slow_servers["impatient"]
    assert server.proc is not None
    result: dict[str, Any] = {}
    worker = threading.Thread(target=_long_request, args=(server.url, result))
    worker.start()
    wait_for(lambda: sample(server.url, "metalserve_in_flight_requests") == 1)

    server.proc.send_signal(signal.SIGTERM)
    worker.join(timeout=30)
    # A 503 "shut down" proves the abort: left alone the request ends 200. (No wall-clock bound
    # tighter than wait()'s: under make test's parallel molecule load exiting took over 6 s.)
    assert result["status"] == 503
    assert "shut down" in result["body"]["error"]["message"]
    assert server.proc.wait(timeout=15) == 0


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "engine-process"])
def test_sigterm_while_loading_exits_at_once(
    model_store: Store, tmp_path: Path, engine_process: bool
) -> None:
    """A replica stopped before it is ready must not wait for its model load to finish (nor
    for its engine's process's)."""
    server = Server(
        # The warm-up alone takes 4 x 2 s.
        serve_args(model_store, debug_step_delay=2, engine_process=engine_process),
        tmp_path / "loading.log",
    ).start()
    assert server.proc is not None
    try:
        with httpx.Client(timeout=2) as client:
            wait_for(
                lambda: (
                    server.poll(client, time.monotonic()) is False
                    and server.readiness[-1][1] == 503
                ),
                timeout=60,
                interval=0.05,
            )
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert server.proc.wait(timeout=10) == 0
        assert time.monotonic() - signalled < 5
    finally:
        server.stop()
