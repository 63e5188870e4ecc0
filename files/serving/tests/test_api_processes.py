"""Several API processes in front of one engine process (``serve --api-processes``), against
real servers.

The API's tests of completions, chats, batching and hot reloads run here again against a
replica of three API processes (imported below, they take this module's ``api_server`` and
``reload_server``): their requests reach whichever process the kernel hands each connection,
the reload under load included (no request may fail while the other processes switch). The
tests of its own: every process serves, the replica's metrics count every process's requests,
probes and the admin API answer the same through any process, SIGTERM drains them all, and a
lost API process ends the replica.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ADMIN_TOKEN, MODEL, Server, Store, serve_args, wait_all_ready

# Rerun here (the names must stay: pytest collects them from this module too).
from test_admin import (  # noqa: F401
    admin,
    test_hot_reload_under_load,
    test_refuses_unknown_versions,
)
from test_engine_process import LONG, STEP_DELAY, sample, wait_for
from test_openai_routes import (  # noqa: F401
    TestChat,
    TestCompletions,
    test_concurrent_requests_are_batched,
)

pytestmark = pytest.mark.e2e

API_PROCESSES = 3
# Connections opened at most to see more than one API process answer (the kernel hands each
# new connection to whichever process accepts first).
MAX_CONNECTIONS = 120


@pytest.fixture(scope="module")
def shared_server(
    model_store: Store, admin_token_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """conftest's "api" and "reload" flags together, three API processes."""
    logs = tmp_path_factory.mktemp("api-processes-logs")
    server = Server(
        serve_args(
            model_store,
            engine_process=True,
            api_processes=API_PROCESSES,
            max_batch_size=8,
            max_new_tokens=64,
            max_prompt_tokens=256,
            admin_token_file=admin_token_file,
        ),
        logs / "shared.log",
    ).start()
    try:
        wait_all_ready(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_server(shared_server: Server) -> Server:
    return shared_server


@pytest.fixture(scope="module")
def reload_server(shared_server: Server) -> Server:
    return shared_server


def answered_by(server: Server) -> dict[int, int]:
    """Completions answered so far by each API process, from the access log's lines."""
    counts: dict[int, int] = {}
    for match in re.finditer(r"POST /v1/completions 200 .* api_process=(\d+)", server.log()):
        counts[int(match[1])] = counts.get(int(match[1]), 0) + 1
    return counts


def pids_of_api_processes(server: Server) -> list[int]:
    return [int(pid) for pid in re.findall(r"API process \d+ \(pid (\d+)\)", server.log())]


def _complete(url: str, body: dict[str, Any], results: list[httpx.Response]) -> None:
    results.append(httpx.post(f"{url}/v1/completions", json=body, timeout=30))


def test_every_api_process_serves_and_the_metrics_count_them_all(shared_server: Server) -> None:
    url = shared_server.url
    before = {
        "requests": sample(
            url, "metalserve_requests_total", endpoint="/v1/completions", status="200"
        ),
        "latency": sample(
            url, "metalserve_request_duration_seconds_count", endpoint="/v1/completions"
        ),
        "first": sample(
            url, "metalserve_time_to_first_token_seconds_count", endpoint="completions"
        ),
    }
    earlier = answered_by(shared_server)

    def answered_here() -> dict[int, int]:
        now = answered_by(shared_server).items()
        return {
            index: count - earlier.get(index, 0)
            for index, count in now
            if count > earlier.get(index, 0)
        }

    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
    sent, answers = 0, set()
    # A new connection each (a client's pooled one would stay with one process), in waves
    # of concurrent requests, until two processes answered or the connections ran out.
    while sent < MAX_CONNECTIONS and len(answered_here()) < 2:
        results: list[httpx.Response] = []
        wave = [threading.Thread(target=_complete, args=(url, body, results)) for _ in range(12)]
        for thread in wave:
            thread.start()
        for thread in wave:
            thread.join(60)
        sent += len(wave)
        assert [r.status_code for r in results] == [200] * len(wave), [r.text for r in results]
        answers |= {r.json()["choices"][0]["text"] for r in results}
    counts = answered_here()
    assert len(counts) >= 2, f"one API process answered all {sent}: {counts}"
    assert len(answers) == 1, "every process's answer is the engine's, greedy: the same"
    assert sum(counts.values()) == sent
    # The first process's metrics count the others' requests: HTTP (theirs) and engine (its).
    assert (
        sample(url, "metalserve_requests_total", endpoint="/v1/completions", status="200")
        == before["requests"] + sent
    )
    assert (
        sample(url, "metalserve_request_duration_seconds_count", endpoint="/v1/completions")
        == before["latency"] + sent
    )
    assert (
        sample(url, "metalserve_time_to_first_token_seconds_count", endpoint="completions")
        == before["first"] + sent
    )
    assert sample(url, "metalserve_ready") == 1, "the first process's readiness, not summed"


def test_bench_counts_every_api_process_cpu_as_the_apis(shared_server: Server) -> None:
    from metalserve.bench.serve import _cpu_seconds, server_cpu_seconds

    assert shared_server.proc is not None
    main = shared_server.proc.pid
    seconds = server_cpu_seconds(main)
    others = sum(_cpu_seconds(pid) for pid in pids_of_api_processes(shared_server))
    assert others > 0, "the other API processes ran"
    assert seconds["api"] >= _cpu_seconds(main) + others - 0.05  # read a moment apart
    assert seconds["engine"] > 0


def test_probes_and_the_admin_api_answer_alike_through_every_process(
    shared_server: Server, model_store: Store
) -> None:
    url = shared_server.url
    versions, readiness = [], []
    # Fresh connections: some reach the other processes, which hand these to the first.
    for _ in range(12):
        versions.append(httpx.get(f"{url}/version").json())
        readiness.append(httpx.get(f"{url}/readyz").status_code)
    assert readiness == [200] * 12
    assert {v["api_processes"] for v in versions} == {API_PROCESSES}
    assert {v["version_id"] for v in versions} == {model_store.v1}
    assert {v["startup_seconds"]["ready"] for v in versions} == {
        versions[0]["startup_seconds"]["ready"]
    }, "one process's answer"
    refused = httpx.post(f"{url}/admin/reload", json={"version": model_store.v2})
    assert refused.status_code == 401
    denied = httpx.post(
        f"{url}/admin/reload",
        json={"version": "f" * 64},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
    )
    assert denied.status_code == 404, denied.text
    assert denied.headers["x-request-id"], "the first process's answer, its id"


def test_an_oversized_body_is_refused_by_whichever_process_takes_it(
    shared_server: Server,
) -> None:
    """The other processes read what they hand over whole: the first one's body limit holds
    there too, before anything is handed over (the first one logs only what reaches it)."""

    def reached_the_first() -> int:
        return len(re.findall(r"POST /admin/reload 413 ", shared_server.log()))

    earlier, sent, statuses = reached_the_first(), 0, []
    while sent < 40 and reached_the_first() - earlier == sent:  # until another took one
        response = httpx.post(  # a fresh connection each
            f"{shared_server.url}/admin/reload",
            content=b"x" * (9 * 1024 * 1024),
            headers={"content-type": "application/json", "authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )
        statuses.append(response.status_code)
        sent += 1
        deadline = time.monotonic() + 1.0  # the first one logs it just after it answered
        while reached_the_first() - earlier < sent and time.monotonic() < deadline:
            time.sleep(0.02)
    assert statuses == [413] * sent
    assert reached_the_first() - earlier < sent, "no other API process took one in 40"


def _long_request(url: str, result: dict[str, Any]) -> None:
    response = httpx.post(f"{url}/v1/completions", json=LONG, timeout=60)
    result["status"], result["body"] = response.status_code, response.json()


def shared_slow_server(model_store: Store, log: Path) -> Server:
    server = Server(
        serve_args(
            model_store,
            engine_process=True,
            api_processes=API_PROCESSES,
            debug_step_delay=STEP_DELAY,
            max_new_tokens=100,
        ),
        log,
    ).start()
    wait_all_ready(server)
    return server


def test_sigterm_drains_every_api_process(model_store: Store, tmp_path: Path) -> None:
    server = shared_slow_server(model_store, tmp_path / "drain.log")
    try:
        assert server.proc is not None
        others = pids_of_api_processes(server)
        assert len(others) == API_PROCESSES - 1
        results: list[dict[str, Any]] = [{} for _ in range(8)]
        requests = [
            threading.Thread(target=_long_request, args=(server.url, result)) for result in results
        ]
        for request in requests:
            request.start()
        wait_for(lambda: sample(server.url, "metalserve_in_flight_requests") == len(results))
        served = answered_by(server)
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 503)
        refused = httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=30)
        assert refused.status_code == 503
        for request in requests:
            request.join(60)
        assert [r["status"] for r in results] == [200] * len(results), results
        assert {r["body"]["usage"]["completion_tokens"] for r in results} == {60}
        assert server.proc.wait(timeout=30) == 0
        assert served == {}, "none had ended before the signal"
        assert len(answered_by(server)) >= 1
        for pid in others:
            assert not Path(f"/proc/{pid}").exists(), f"API process {pid} ended too"
        assert "did not drain" not in server.log()
    finally:
        server.stop()


def test_a_lost_api_process_ends_the_replica(model_store: Store, tmp_path: Path) -> None:
    server = shared_slow_server(model_store, tmp_path / "lost.log")
    try:
        assert server.proc is not None
        others = pids_of_api_processes(server)
        os.kill(others[0], signal.SIGKILL)
        code = server.proc.wait(timeout=60)
        assert code == 8, server.log()[-2000:]  # ExitCode.API_PROCESS_FAILED: systemd restarts
        assert f"(pid {others[0]}) ended: -9" in server.log()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{others[1]}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{others[1]}").exists(), "the other API process ended too"
    finally:
        server.stop()
