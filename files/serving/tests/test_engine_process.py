"""The engine in a process of its own (``serve --engine-process``), against real servers.

The API's tests of completions, chats, batching, hot reloads and profiles run here again against
such a server: imported below, they take this module's ``api_server`` and ``reload_server`` (one
server with both roles' flags). The tests of its own: the process, the metrics the API counts for
it, a full queue, a client gone, the engine's process killed, SIGTERM. The systemd watchdog over
its heartbeat: ``test_sdnotify``.
"""

from __future__ import annotations

import json
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

from conftest import MODEL, Server, Store, serve_args, wait_all_ready
from engine_helpers import alone
from metalserve.loader import LoadedModel
from metalserve.sampling import SamplingParams

# Rerun here (the names must stay: pytest collects them from this module too).
from test_admin import (  # noqa: F401
    admin,
    test_hot_reload_under_load,
    test_refuses_a_corrupt_version_and_keeps_serving,
    test_refuses_unknown_versions,
)
from test_openai_routes import (  # noqa: F401
    TestChat,
    TestCompletions,
    test_concurrent_requests_are_batched,
)
from test_profile import test_a_profile_under_requests  # noqa: F401

pytestmark = pytest.mark.e2e

STEP_DELAY = 0.02
LONG = {"model": MODEL, "prompt": "Hi", "max_tokens": 60, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def split_server(
    model_store: Store, admin_token_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The flags of conftest's "api" and "reload" servers together, the engine apart."""
    logs = tmp_path_factory.mktemp("engine-process-logs")
    server = Server(
        serve_args(
            model_store,
            engine_process=True,
            no_access_log=True,
            max_batch_size=8,
            max_new_tokens=64,
            max_prompt_tokens=256,
            admin_token_file=admin_token_file,
            profile_dir=logs / "profiles",
        ),
        logs / "split.log",
    ).start()
    try:
        wait_all_ready(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_server(split_server: Server) -> Server:
    return split_server


@pytest.fixture(scope="module")
def reload_server(split_server: Server) -> Server:
    return split_server


def slow_server(model_store: Store, log: Path, **flags: Any) -> Server:
    server = Server(
        serve_args(
            model_store,
            engine_process=True,
            debug_step_delay=STEP_DELAY,
            max_new_tokens=100,
            **flags,
        ),
        log,
    ).start()
    wait_all_ready(server)
    return server


def engine_process_of(server: Server) -> int:
    """The pid of ``server``'s engine process (its child running ``metalserve.core.process``)."""
    assert server.proc is not None
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
    engines = [
        int(pid)
        for pid in children.split()
        if b"metalserve.core.process" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(engines) == 1, f"children {children!r}"
    return engines[0]


def sample(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_the_engine_runs_in_a_process_of_its_own(split_server: Server) -> None:
    engine = engine_process_of(split_server)
    assert engine != split_server.proc.pid  # type: ignore[union-attr]
    # What the engine's process built, as /version tells it.
    version = httpx.get(f"{split_server.url}/version").json()
    assert version["engine_process"] is True
    assert version["decode_path"] == "dynamic"
    assert version["max_batch_size"] == 8
    assert version["weight_bytes"] > 0


def started_at(pid: int) -> float:
    """Process ``pid``'s start, in seconds since boot (/proc's clock ticks)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")


def test_the_engine_process_starts_before_the_api_imports_its_own(split_server: Server) -> None:
    """``serve`` starts the engine's process before it imports FastAPI and builds the app, so
    that torch's import there runs beside them (on a GPU host 0.3-0.6 s sooner ready); its
    imports, counted from the API's start call, then add up with the other phases to ready."""
    assert split_server.proc is not None
    engine = engine_process_of(split_server)
    engine_after_api = started_at(engine) - started_at(split_server.proc.pid)
    startup = httpx.get(f"{split_server.url}/version").json()["startup_seconds"]
    # process_start: the API's start to its start call, after the imports and the app.
    assert startup["process_start"] - engine_after_api >= 0.1, (engine_after_api, startup)
    phases = ["process_start", "imports", "load", "warmup", "decode_path", "tokenizer"]
    assert sum(startup[phase] for phase in phases) <= startup["ready"] + 0.01, startup


def test_the_api_freezes_its_imports_heap_before_ready(split_server: Server) -> None:
    """Three heap freezes: the API process's once its imports are done (while the engine's
    process loads: nothing else for its event loop to do), the engine process's once it has
    answered the start call, and the API's at ready, which then collects only what came after
    its first (the views): it held the event loop for the whole heap as the first requests
    came."""
    deadline = time.monotonic() + 10
    while len(freezes := re.findall(r"froze (\d+) objects", split_server.log())) < 3:
        assert time.monotonic() < deadline, freezes
        time.sleep(0.05)
    assert len(freezes) == 3, freezes


def test_serve_refused_ends_the_engine_process_it_started(
    model_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unusable admin token file ends ``serve`` with a usage error, and the engine's process
    it started beforehand with it (at once: nothing was asked of it)."""
    from metalserve import cli
    from metalserve.core import spawn
    from metalserve.exitcodes import ExitCode

    started: list[spawn.EngineProcess] = []
    real = spawn.spawn_engine_process

    def spawned(api_processes: int = 1) -> spawn.EngineProcess:
        started.append(real(api_processes))
        return started[-1]

    monkeypatch.setattr(spawn, "spawn_engine_process", spawned)
    empty = tmp_path / "token"
    empty.write_text("\n")
    args = serve_args(model_store, engine_process=True, admin_token_file=empty)
    assert cli.main(["serve", *args]) == ExitCode.USAGE
    assert len(started) == 1
    assert started[0].process.returncode is not None  # ended, not left running


def test_answers_are_the_models(split_server: Server, v1: LoadedModel) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = alone(v1, "The quick brown fox", params)
    body = {**LONG, "prompt": "The quick brown fox", "max_tokens": 12}
    answer = httpx.post(f"{split_server.url}/v1/completions", json=body, timeout=30).json()
    assert answer["choices"][0]["text"] == expected
    assert answer["system_fingerprint"] == f"{MODEL}@{v1.short_id}"


def test_the_api_counts_what_the_engine_did(split_server: Server) -> None:
    url = split_server.url
    before = {
        "finished": sample(url, "metalserve_sequences_finished_total", reason="length"),
        "generated": sample(url, "metalserve_generated_tokens_total"),
        "first": sample(url, "metalserve_time_to_first_token_seconds_count", endpoint="chat"),
        "queued": sample(url, "metalserve_request_queue_time_seconds_count"),
        "decode": sample(url, "metalserve_forward_passes_total", phase="decode"),
    }
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    for _ in range(3):
        chat = httpx.post(f"{url}/v1/chat/completions", json={**body, "temperature": 0}, timeout=30)
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["finish_reason"] == "length"
    # The engine's last observations come with its last events: counted by the answer's end.
    assert sample(url, "metalserve_sequences_finished_total", reason="length") == (
        before["finished"] + 3
    )
    assert sample(url, "metalserve_generated_tokens_total") == before["generated"] + 15
    assert sample(url, "metalserve_time_to_first_token_seconds_count", endpoint="chat") == (
        before["first"] + 3
    )
    assert sample(url, "metalserve_request_queue_time_seconds_count") == before["queued"] + 3
    assert sample(url, "metalserve_forward_passes_total", phase="decode") >= before["decode"] + 12


@pytest.fixture(scope="module")
def slow(model_store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Slow steps, 2 slots and 2 places in the queue."""
    server = slow_server(
        model_store,
        tmp_path_factory.mktemp("slow-engine-process") / "slow.log",
        max_batch_size=2,
        max_queue=2,
    )
    try:
        yield server
    finally:
        server.stop()


def _stream_first_event(url: str, result: dict[str, Any], done: threading.Event) -> None:
    """Stream LONG: the status and, once it came, the first event; then wait for ``done``."""
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as response,
    ):
        result["status"] = response.status_code
        lines = response.iter_lines()  # kept: a dropped iterator closes the response
        if response.status_code == 200:
            result["first"] = next(line for line in lines if line)
        done.wait(30)


def test_a_full_queue_is_429_and_a_client_gone_is_cancelled(slow: Server) -> None:
    url = slow.url
    cancelled = sample(url, "metalserve_sequences_finished_total", reason="cancelled")
    done = threading.Event()
    results: list[dict[str, Any]] = [{} for _ in range(4)]
    streams = [
        threading.Thread(target=_stream_first_event, args=(url, result, done)) for result in results
    ]
    try:
        for stream in streams:
            stream.start()
        # 2 run and 2 wait: all the replica takes (60 tokens each take over a second).
        wait_for(lambda: sum("status" in r for r in results) == 4)
        refused = httpx.post(f"{url}/v1/completions", json=LONG, timeout=30)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
    finally:
        done.set()  # every client goes away mid-stream
        for stream in streams:
            stream.join(30)
    assert [r["status"] for r in results] == [200] * 4
    wait_for(
        lambda: (
            sample(url, "metalserve_sequences_finished_total", reason="cancelled") >= cancelled + 4
        )
    )
    wait_for(lambda: sample(url, "metalserve_num_requests_running") == 0)
    passes = sample(url, "metalserve_forward_passes_total", phase="decode")
    time.sleep(5 * STEP_DELAY)
    assert sample(url, "metalserve_forward_passes_total", phase="decode") == passes
    accepted = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 2}, timeout=30)
    assert accepted.status_code == 200, "the queue's places came back"


def test_sigterm_drains_then_both_processes_end(slow: Server) -> None:
    assert slow.proc is not None
    engine = engine_process_of(slow)
    result: dict[str, Any] = {}

    def long_request() -> None:
        response = httpx.post(f"{slow.url}/v1/completions", json=LONG, timeout=60)
        result["status"], result["body"] = response.status_code, response.json()

    worker = threading.Thread(target=long_request)
    worker.start()
    wait_for(lambda: sample(slow.url, "metalserve_num_requests_running") == 1)
    slow.proc.send_signal(signal.SIGTERM)
    worker.join(60)
    assert result["status"] == 200, result
    assert result["body"]["usage"]["completion_tokens"] == 60
    assert slow.proc.wait(timeout=20) == 0
    assert not Path(f"/proc/{engine}").exists(), "the engine's process ended too"


def test_a_dead_engine_process_fails_its_requests_and_health(
    model_store: Store, tmp_path: Path
) -> None:
    server = slow_server(model_store, tmp_path / "doomed.log")
    try:
        events: list[str] = []

        def stream() -> None:
            body = {**LONG, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
                events.extend(line for line in r.iter_lines() if line)

        reader = threading.Thread(target=stream)
        reader.start()
        wait_for(lambda: len(events) >= 2)
        os.kill(engine_process_of(server), signal.SIGKILL)
        reader.join(30)
        last = json.loads(events[-1].removeprefix("data: "))
        assert last["error"]["code"] == "generation_failed", events[-3:]
        assert "engine stopped" in last["error"]["message"]
        health = httpx.get(f"{server.url}/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "engine-dead"
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        refused = httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=30)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "engine_dead"
    finally:
        server.stop()
