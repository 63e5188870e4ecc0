"""``metalserve load``: run as a subprocess against real replicas (and a few pure functions).

A small stdlib HTTP server stands in for a misbehaving upstream (HTML 503s, cut streams, slow
answers) where the real replica cannot be made to misbehave; it never replaces the replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import METALSERVE, MODEL, Server, Store, free_port, run_cli
from metalserve.bench import loadgen
from metalserve.bench.loadgen import RequestResult
from metalserve.bench.options import DEFAULT_PROMPTS, LoadSettings
from metalserve.exitcodes import ExitCode

FINGERPRINT = re.compile(rf"^{re.escape(MODEL)}@[0-9a-f]{{12}}$")


def load(*args: str, timeout: float = 60.0) -> tuple[subprocess.CompletedProcess[str], Any]:
    """Run ``metalserve load``; returns the process and its JSON summary (None if none)."""
    result = run_cli("load", *args, timeout=timeout)
    try:
        summary = json.loads(result.stdout)
    except ValueError:
        summary = None
    return result, summary


def check_consistent(summary: dict[str, Any]) -> None:
    assert summary["sent"] == summary["ok"] + summary["failed"]
    assert summary["sent"] == summary["streaming"] + summary["non_streaming"]
    assert sum(summary["failures"].values()) == summary["failed"]
    assert sum(summary["fingerprints"].values()) == summary["ok"]


# --- against the real replica ---------------------------------------------------------------


@pytest.mark.e2e
def test_load_against_a_replica(api_server: Server, model_store: Store, tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    started = time.monotonic()
    result, summary = load(
        api_server.url,
        "--duration", "5",
        "--concurrency", "3",
        "--stream-ratio", "0.5",
        "--out", str(out),
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == ExitCode.OK, result.stderr
    assert json.loads(out.read_text()) == summary
    check_consistent(summary)
    assert summary["model"] == MODEL  # read from /v1/models
    assert summary["url"] == api_server.url
    assert summary["stopped_by"] == "duration"
    assert 5 <= summary["duration_s"] < 5 + 30
    assert elapsed < 30
    assert summary["sent"] > 0
    assert summary["failed"] == 0, summary["failure_examples"]
    assert summary["streaming"] > 0
    assert summary["non_streaming"] > 0
    assert abs(summary["streaming"] - summary["non_streaming"]) <= 3  # one per worker at most
    assert summary["fingerprints"] == {f"{MODEL}@{model_store.v1[:12]}": summary["ok"]}
    assert all(FINGERPRINT.match(key) for key in summary["fingerprints"])
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    assert summary["requests_per_s"] > 0
    assert summary["failures"] == {}
    assert summary["failure_examples"] == []


@pytest.mark.e2e
def test_max_requests_stops_at_exactly_that_many(api_server: Server) -> None:
    result, summary = load(
        api_server.url, "--model", MODEL, "--max-requests", "7", "--concurrency", "3",
        "--duration", "60", "--prompt", "Hello there", "--prompt", "One two three four",
    )  # fmt: skip
    assert result.returncode == ExitCode.OK, result.stderr
    check_consistent(summary)
    assert summary["sent"] == summary["ok"] == 7
    assert summary["stopped_by"] == "max_requests"
    assert summary["streaming"] == 3  # floor(7 * 0.5), spread evenly over the indices
    assert summary["duration_s"] < 30


@pytest.mark.e2e
def test_rate_paces_the_requests(api_server: Server) -> None:
    # 10 requests at 20/s: the last is due 0.45 s after the start; unpaced they take far less.
    result, summary = load(
        api_server.url, "--model", MODEL, "--max-requests", "10", "--rate", "20",
        "--concurrency", "4", "--duration", "30", "--prompt", "Hello there",
    )  # fmt: skip
    assert result.returncode == ExitCode.OK, result.stderr
    assert summary["sent"] == summary["ok"] == 10
    assert summary["duration_s"] >= 0.45
    assert summary["requests_per_s"] <= 10 / 0.45  # the fastest 10 paced requests can be


def test_unreachable_endpoint_fails_every_request() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result, summary = load(url, "--model", MODEL, "--max-requests", "10", "--duration", "10")
    assert result.returncode == ExitCode.FAILURE
    check_consistent(summary)
    assert summary["sent"] == summary["failed"] == 10
    assert summary["failures"] == {"ConnectError": 10}
    assert 1 <= len(summary["failure_examples"]) <= 5
    assert summary["latency_ms"] == {"p50": None, "p99": None, "max": None}


def test_unreachable_model_lookup_is_an_error() -> None:
    result, summary = load(f"http://127.0.0.1:{free_port()}", "--max-requests", "3")
    assert result.returncode == ExitCode.FAILURE
    assert summary is None
    assert "/v1/models" in result.stderr
    assert "ConnectError" in result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "reason"),
    [
        # The api_server allows at most 64 new tokens.
        (["--model", MODEL, "--max-tokens", "100"], "http 400: max_tokens is 100"),
        (["--model", "no-such-model"], "http 404: the model 'no-such-model' does not exist"),
    ],
)
def test_rejected_requests_are_failures(api_server: Server, args: list[str], reason: str) -> None:
    result, summary = load(api_server.url, *args, "--max-requests", "4", "--concurrency", "2")
    assert result.returncode == ExitCode.FAILURE, result.stderr
    check_consistent(summary)
    assert summary["sent"] == summary["failed"] == 4
    assert summary["streaming"] == summary["non_streaming"] == 2
    [(got, count)] = summary["failures"].items()
    assert got.startswith(reason), got
    assert len(got) <= len("http 400: ") + loadgen.ERROR_CHARS
    assert count == 4


def start_load(*args: str) -> subprocess.Popen[str]:
    """Start ``metalserve load`` and return once it has started sending."""
    proc = subprocess.Popen(
        [METALSERVE, "load", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        assert selector.select(timeout=30), "no start line"
    line = proc.stderr.readline()
    assert line.startswith("load: "), line
    time.sleep(1.5)  # let it send a few requests
    return proc


@pytest.mark.e2e
def test_sigterm_stops_early_with_a_summary(api_server: Server) -> None:
    proc = start_load(api_server.url, "--duration", "120", "--concurrency", "2")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - signalled < 15
    assert proc.returncode == ExitCode.OK, stderr
    summary = json.loads(stdout)
    check_consistent(summary)
    assert summary["stopped_by"] == "signal"
    assert summary["sent"] > 0
    assert summary["failed"] == 0, summary["failure_examples"]
    assert summary["duration_s"] < 30


@pytest.mark.e2e
def test_stop_file_stops_it(api_server: Server, tmp_path: Path) -> None:
    stop_file = tmp_path / "stop"
    proc = start_load(
        api_server.url, "--duration", "120", "--concurrency", "2", "--stop-file", str(stop_file)
    )
    stop_file.touch()
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.OK, stderr
    summary = json.loads(stdout)
    check_consistent(summary)
    assert summary["stopped_by"] == "stop_file"
    assert summary["sent"] > 0
    assert summary["duration_s"] < 30


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--duration", "0"], "--duration"),
        (["--duration", "3601"], "--duration"),
        (["--duration", "soon"], "--duration"),
        (["--stream-ratio", "2"], "--stream-ratio"),
        (["--stream-ratio", "-0.1"], "--stream-ratio"),
        (["--concurrency", "0"], "--concurrency"),
        (["--concurrency", "257"], "--concurrency"),
        (["--max-requests", "0"], "--max-requests"),
        (["--rate", "-1"], "--rate"),
        (["--prompt", ""], "--prompt"),
        (["--insecure", "--cacert", "/etc/hostname"], "--cacert"),
        (["--header", "X-User user-7"], "--header"),
        (["--header", ": no name"], "--header"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(args: list[str], flag: str) -> None:
    # A listening port is never touched: arguments are checked before anything is sent.
    result, summary = load("http://127.0.0.1:9", "--model", MODEL, *args)
    assert result.returncode == ExitCode.USAGE
    assert flag in result.stderr
    assert summary is None


@pytest.mark.e2e
def test_load_needs_no_serving_stack(api_server: Server) -> None:
    """Load-balancer hosts run ``metalserve load`` without torch, FastAPI or transformers."""
    blocked = ["torch", "transformers", "fastapi", "uvicorn", "safetensors", "prometheus_client"]
    program = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # any import of them now fails\n"
        "from metalserve.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, "load", api_server.url, "--max-requests", "4"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "ModuleNotFoundError" not in result.stderr, result.stderr
    assert "import of" not in result.stderr, result.stderr
    assert result.returncode == ExitCode.OK, result.stderr
    assert json.loads(result.stdout)["ok"] == 4


# --- a misbehaving upstream -----------------------------------------------------------------


class Upstream(ThreadingHTTPServer):
    daemon_threads = True
    mode = "ok"
    seen: list[tuple[str | None, dict[str, Any]]]
    users: list[str | None]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that timed out hang up: expected here


class UpstreamHandler(BaseHTTPRequestHandler):
    server: Upstream
    # HTTP/1.0: every response ends with the connection, so a cut stream is just a close.

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.send(200, b'{"object": "list", "data": [{"id": "upstream-model"}]}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.headers.get("Authorization"), body))
        self.server.users.append(self.headers.get("X-User"))
        chunk = b'data: {"choices": [{"text": "x"}], "system_fingerprint": "m@0123456789ab"}\n\n'
        mode = self.server.mode
        if mode == "slow":
            time.sleep(1.5)
        if mode == "html503":
            self.send(503, b"<html><body>No server is available</body></html>", "text/html")
        elif mode == "malformed":
            self.send(200, b'{"choices": []}')
        elif mode == "cut":
            self.send(200, chunk, "text/event-stream")
        elif mode == "error_event":
            error = b'data: {"error": {"message": "generation failed", "type": "server_error"}}\n\n'
            self.send(200, chunk + error + b"data: [DONE]\n\n", "text/event-stream")
        elif body["stream"]:
            self.send(200, chunk + b"data: [DONE]\n\n", "text/event-stream")
        else:
            self.send(200, b'{"choices": [{"text": "x"}], "system_fingerprint": "m@0123456789ab"}')


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream(("127.0.0.1", 0), UpstreamHandler)
    server.seen = []
    server.users = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def upstream_url(server: Upstream) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize(
    ("mode", "stream_ratio", "reason"),
    [
        ("html503", 0.5, "http 503"),
        ("malformed", 0.0, "malformed body"),
        ("cut", 1.0, "stream ended before [DONE]"),
        ("error_event", 1.0, "stream error: generation failed"),
        ("slow", 0.5, "timeout after 1s"),
    ],
)
def test_upstream_failures_are_classified(
    upstream: Upstream, mode: str, stream_ratio: float, reason: str
) -> None:
    upstream.mode = mode
    settings = LoadSettings(
        url=upstream_url(upstream),
        model="m",
        concurrency=2,
        max_requests=2,
        stream_ratio=stream_ratio,
        timeout=1.0,
    )
    summary = asyncio.run(loadgen.run_load(settings, handle_signals=False))
    check_consistent(summary)
    assert summary["failures"] == {reason: 2}
    assert loadgen.exit_code(summary) == 1


def test_api_key_from_the_environment_and_model_lookup(upstream: Upstream) -> None:
    env = {**os.environ, "METALSERVE_LOAD_API_KEY": "s3cret"}
    result = subprocess.run(
        [METALSERVE, "load", upstream_url(upstream) + "/", "--max-requests", "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == ExitCode.OK, result.stderr
    summary = json.loads(result.stdout)
    assert summary["fingerprints"] == {"m@0123456789ab": 4}
    assert summary["url"] == upstream_url(upstream)
    assert {auth for auth, _ in upstream.seen} == {"Bearer s3cret"}
    bodies = sorted((b for _, b in upstream.seen), key=lambda b: (b["temperature"], b.get("seed")))
    assert {b["model"] for b in bodies} == {"upstream-model"}
    # Requests 0, 1 greedy; 2, 3 sampled with their index as seed.
    assert [b["temperature"] for b in bodies] == [0, 0, 0.8, 0.8]
    assert [b.get("seed") for b in bodies][2:] == [2, 3]

    flag = subprocess.run(
        [METALSERVE, "load", upstream_url(upstream), "--max-requests", "1", "--api-key", "k2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert flag.returncode == ExitCode.OK, flag.stderr
    assert upstream.seen[-1][0] == "Bearer k2"


def test_headers_go_with_every_request(upstream: Upstream) -> None:
    """--header (e.g. the header an A/B split is sticky on) beside the API key."""
    result = subprocess.run(
        [
            METALSERVE,
            "load",
            upstream_url(upstream),
            "--max-requests",
            "3",
            "--api-key",
            "k3",
            "--header",
            "X-User: user-7",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == ExitCode.OK, result.stderr
    assert upstream.users == ["user-7"] * 3
    assert {auth for auth, _ in upstream.seen} == {"Bearer k3"}


# --- pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.7, 1.0])
def test_streaming_fraction_is_even(ratio: float) -> None:
    plan = [loadgen.is_streaming(i, ratio) for i in range(1000)]
    for n in (1, 7, 10, 100, 1000):
        assert abs(sum(plan[:n]) - n * ratio) < 1


def test_plan_covers_stream_and_greedy_combinations() -> None:
    settings = LoadSettings(url="http://x", stream_ratio=0.5)
    bodies = [loadgen.request_body(i, settings, "m") for i in range(16)]
    combos = {(b["stream"], b["temperature"] == 0) for b in bodies[:4]}
    assert combos == {(True, True), (True, False), (False, True), (False, False)}
    assert {b["prompt"] for b in bodies} == set(DEFAULT_PROMPTS)
    lengths = sorted(len(p.split()) for p in DEFAULT_PROMPTS)
    assert lengths[0] < 10
    assert 40 <= lengths[-1] <= 70
    assert len(set(lengths)) == len(lengths)


def test_summary() -> None:
    results = [
        RequestResult(0, False, True, 0.010, fingerprint="m@a", done_s=0.2),
        RequestResult(1, True, True, 0.030, fingerprint="m@b", done_s=0.4),
        RequestResult(2, False, False, 0.001, "http 503", "#2 non-stream: http 503", done_s=0.5),
        # The longest stretch without a success: from 0.4 s to 1.6 s (the failure does not count).
        RequestResult(3, True, True, 0.020, fingerprint="m@a", done_s=1.6),
    ]
    summary = loadgen.summarize("http://lb", "m", 2.0, results, "duration")
    assert summary == {
        "url": "http://lb",
        "model": "m",
        "duration_s": 2.0,
        "sent": 4,
        "ok": 3,
        "failed": 1,
        "streaming": 2,
        "non_streaming": 2,
        "requests_per_s": 2.0,
        "latency_ms": {"p50": 20.0, "p99": 30.0, "max": 30.0},
        "longest_gap_s": 1.2,
        "failures": {"http 503": 1},
        "failure_examples": ["#2 non-stream: http 503"],
        "fingerprints": {"m@a": 2, "m@b": 1},
        "stopped_by": "duration",
    }
    assert loadgen.exit_code(summary) == 1
    empty = loadgen.summarize("http://lb", "m", 1.0, [], "signal")
    assert empty["latency_ms"] == {"p50": None, "p99": None, "max": None}
    assert empty["longest_gap_s"] == 1.0  # no success at all: the whole run
    assert loadgen.exit_code(empty) == 1
