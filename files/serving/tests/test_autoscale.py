"""``metalserve autoscale``: its policy, and the controller against a real HAProxy (the host's).

Prometheus does not run on this host (the lab's does, in the cluster scenario), so its query API
is a small HTTP server here answering the one query the controller makes with set figures.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError

from conftest import run_cli
from metalserve.autoscale import controller, haproxy, prometheus
from metalserve.autoscale.policy import Observation, Policy, State, decide
from metalserve.settings import AutoscaleSettings

BACKEND = "metalserve_replicas"

# --- the policy ------------------------------------------------------------------------------


def seen(load: float | None, active: int = 2, standbys: int = 1, promoted: int = 0) -> Observation:
    names = [f"r{i}" for i in range(active)]
    return Observation(
        active=tuple(names),
        standbys=tuple(f"s{i}" for i in range(standbys)),
        promoted=tuple(f"r{i}" for i in range(active - promoted, active)),
        requests=None if load is None else load * active,
    )


POLICY = Policy(scale_up_at=10, scale_down_at=4, up_after=2, down_after=3, cooldown_s=30)


def test_promotes_only_after_consecutive_hot_evaluations() -> None:
    state = State()
    assert decide(POLICY, state, seen(12), now=0).action == "hold"  # 1 of 2
    assert decide(POLICY, state, seen(7), now=1).action == "hold"  # in the band: resets
    assert decide(POLICY, state, seen(12), now=2).action == "hold"
    decision = decide(POLICY, state, seen(12), now=3)
    assert (decision.action, decision.server) == ("promote", "s0")
    assert "load 12.0 per server in rotation (2)" in decision.reason


def test_cooldown_and_bounds_hold() -> None:
    state = State(last_action_at=0.0)
    for now in (1, 2, 3):
        decision = decide(POLICY, state, seen(20), now=now)
    assert (decision.action, decision.reason.endswith("cooling down")) == ("hold", True)
    assert decide(POLICY, state, seen(20), now=31).action == "promote"  # cooled down
    state = State()
    for now in (0, 1):
        decision = decide(POLICY, state, seen(20, standbys=0), now=now)
    assert decision.reason.endswith("no healthy standby left")
    capped = Policy(scale_up_at=10, scale_down_at=4, up_after=1, max_active=2)
    assert decide(capped, State(), seen(20), now=0).reason.endswith("at max_active")


def test_retires_only_promoted_standbys_after_a_quiet_spell() -> None:
    state = State()
    for now in (0, 1):
        assert decide(POLICY, state, seen(1, active=3, promoted=1), now=now).action == "hold"
    decision = decide(POLICY, state, seen(1, active=3, promoted=1), now=2)
    assert (decision.action, decision.server) == ("retire", "r2")
    state = State()
    for now in (0, 1, 2):
        decision = decide(POLICY, state, seen(1, active=3, promoted=0), now=now)
    assert decision.reason.endswith("no promoted standby to retire")
    floor = Policy(scale_up_at=10, scale_down_at=4, down_after=1, min_active=3)
    assert decide(floor, State(), seen(1, active=3, promoted=1), 0).reason.endswith("min_active")


def test_unknown_load_holds_and_forgets_the_streak() -> None:
    state = State()
    decide(POLICY, state, seen(12), now=0)
    assert decide(POLICY, state, seen(None), now=1).action == "hold"
    assert decide(POLICY, state, seen(12), now=2).action == "hold"  # the streak starts again


def test_ttft_is_a_scale_up_signal_when_asked() -> None:
    policy = Policy(scale_up_at=10, scale_down_at=4, up_after=1, ttft_p99_up_at=0.5)
    slow = Observation(("r0",), ("s0",), (), requests=5, ttft_p99_s=0.8)
    assert decide(policy, State(), slow, now=0).action == "promote"
    assert decide(POLICY, State(), slow, now=0).action == "hold"  # not a signal by default


def test_the_ttft_signal_reads_only_the_backends_replicas() -> None:
    """Other models' replicas are scraped too: their latency must not scale this backend."""
    query = controller.ttft_query(("gpu1-0", "gpu2.lab-1"))
    literal = re.search(r'replica=~"((?:[^"\\]|\\.)*)"', query)
    assert literal, query
    pattern = literal.group(1).replace("\\\\", "\\")  # PromQL's string literal unescaped
    assert all(re.fullmatch(pattern, name) for name in ("gpu1-0", "gpu2.lab-1")), pattern
    others = ("gpu2xlab-1", "gpu3-0", "gpu1-00")
    assert not any(re.fullmatch(pattern, name) for name in others), pattern


def test_bad_settings_name_the_problem() -> None:
    with pytest.raises(ValidationError, match="must be below scale_up_at"):
        AutoscaleSettings(prometheus_url="p", backend=BACKEND, scale_up_at=5, scale_down_at=5)
    with pytest.raises(ValidationError, match="max_active"):
        AutoscaleSettings(prometheus_url="http://p", backend=BACKEND, min_active=3, max_active=2)
    with pytest.raises(ValidationError, match="backend"):
        AutoscaleSettings(prometheus_url="http://p")
    result = run_cli("autoscale", "--prometheus-url", "p", "--backend", BACKEND, "--up-after", "0")
    assert result.returncode == 2
    assert "--up-after" in result.stderr


# --- the controller against HAProxy ---------------------------------------------------------


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@dataclass
class Lab:
    api: haproxy.RuntimeAPI
    socket: Path
    prometheus: str
    load: dict[str, float]  # what the query API answers, per replica


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A real HAProxy: two replicas in rotation and two standbys (weight 0), all health-checked
    against HTTP servers answering 200; and the query API answering ``load``."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        pytest.fail("haproxy is not installed: `make deps` installs it (HOST_PACKAGES)")
    load: dict[str, float] = {}

    class Query(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            assert self.path.startswith("/api/v1/query?")
            result = [{"metric": {"replica": k}, "value": [0, str(v)]} for k, v in load.items()]
            body = json.dumps(
                {"status": "success", "data": {"resultType": "vector", "result": result}}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    replicas = [_serve(_Ready) for _ in range(4)]
    query = _serve(Query)
    sock = tmp_path / "admin.sock"
    servers = "".join(
        f"  server {name} 127.0.0.1:{r.server_address[1]} check inter 200 weight {weight}\n"
        for (name, weight), r in zip(
            [("gpu1-0", 100), ("gpu2-0", 100), ("gpu1-1", 0), ("gpu2-1", 0)], replicas, strict=True
        )
    )
    (tmp_path / "haproxy.cfg").write_text(
        f"global\n  stats socket {sock} mode 600 level admin\n"
        "defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n"
        f"backend {BACKEND}\n  option httpchk GET /readyz\n{servers}"
    )
    process = subprocess.Popen(
        [binary, "-db", "-f", str(tmp_path / "haproxy.cfg")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    api = haproxy.RuntimeAPI(sock)
    try:
        deadline = time.monotonic() + 10
        while not (sock.exists() and all(s.healthy for s in _servers(api))):
            assert process.poll() is None, "haproxy exited"
            assert time.monotonic() < deadline, "the servers did not become healthy"
            time.sleep(0.1)
        yield Lab(api, sock, f"http://127.0.0.1:{query.server_address[1]}", load)
    finally:
        process.terminate()
        process.wait(timeout=10)
        for server in (*replicas, query):
            server.shutdown()


def _servers(api: haproxy.RuntimeAPI) -> list[haproxy.Server]:
    try:
        return api.servers(BACKEND)
    except haproxy.RuntimeAPIError:
        return []


def _weights(api: haproxy.RuntimeAPI) -> dict[str, int]:
    return {s.name: s.weight for s in api.servers(BACKEND)}


def _settings(lab: Lab, **overrides: Any) -> AutoscaleSettings:
    values: dict[str, Any] = {
        "prometheus_url": lab.prometheus,
        "backend": BACKEND,
        "haproxy_socket": lab.socket,
        "scale_up_at": 10,
        "scale_down_at": 4,
        "up_after": 2,
        "down_after": 2,
        "cooldown": 0,
        "metrics_port": 0,
    }
    return AutoscaleSettings(**(values | overrides))


def test_reads_the_backend(lab: Lab) -> None:
    servers = {s.name: s for s in lab.api.servers(BACKEND)}
    assert {n: (s.weight, s.initial_weight, s.healthy) for n, s in servers.items()} == {
        "gpu1-0": (100, 100, True),
        "gpu2-0": (100, 100, True),
        "gpu1-1": (0, 0, True),
        "gpu2-1": (0, 0, True),
    }
    with pytest.raises(haproxy.RuntimeAPIError, match="No such server"):
        lab.api.set_weight(BACKEND, "nope", 100)


def test_a_load_step_promotes_then_retires_standbys(lab: Lab) -> None:
    with httpx.Client(base_url=lab.prometheus) as client:
        scaler = controller.Controller(_settings(lab), lab.api, client)
        lab.load.update({"gpu1-0": 30, "gpu2-0": 30, "gpu1-1": 0, "gpu2-1": 0})
        actions = [scaler.evaluate(now=t).action for t in range(2)]
        assert actions == ["hold", "promote"]
        assert _weights(lab.api) == {"gpu1-0": 100, "gpu2-0": 100, "gpu1-1": 100, "gpu2-1": 0}
        lab.load.update({"gpu1-1": 30})  # still 30 per server: the second standby too
        assert [scaler.evaluate(now=t).action for t in range(2, 4)] == ["hold", "promote"]
        assert set(_weights(lab.api).values()) == {100}
        # Nothing left to promote: holds, saying why.
        for t in range(4, 6):
            decision = scaler.evaluate(now=t)
        assert decision.reason.endswith("no healthy standby left")
        # The load falls: the promoted standbys leave, the configured replicas never.
        lab.load.update(dict.fromkeys(lab.load, 1.0))
        actions = [scaler.evaluate(now=t).action for t in range(6, 14)]
        assert actions.count("retire") == 2
        assert _weights(lab.api) == {"gpu1-0": 100, "gpu2-0": 100, "gpu1-1": 0, "gpu2-1": 0}
        text = generate_latest(scaler.metrics.registry).decode()
        assert 'metalserve_autoscaler_decisions_total{action="promote"} 2.0' in text
        assert 'metalserve_autoscaler_decisions_total{action="retire"} 2.0' in text
        assert 'metalserve_autoscaler_servers{role="standby"} 2.0' in text


def test_dry_run_and_unreachable_parts_change_nothing(lab: Lab) -> None:
    lab.load.update({"gpu1-0": 30, "gpu2-0": 30})
    with httpx.Client(base_url=lab.prometheus) as client:
        dry = controller.Controller(_settings(lab, dry_run=True), lab.api, client)
        assert [dry.evaluate(now=t).action for t in range(2)] == ["hold", "promote"]
    assert _weights(lab.api)["gpu1-1"] == 0  # a dry run only says so
    with httpx.Client(base_url="http://127.0.0.1:9") as client:  # nothing listens there
        blind = controller.Controller(_settings(lab, up_after=1), lab.api, client)
        assert blind.evaluate(now=0).action == "hold"
    gone = haproxy.RuntimeAPI(lab.socket.with_name("missing.sock"))
    with httpx.Client(base_url=lab.prometheus) as client:
        lost = controller.Controller(_settings(lab, up_after=1), gone, client)
        assert "cannot read metalserve_replicas's servers" in lost.evaluate(now=0).reason
        text = generate_latest(lost.metrics.registry).decode()
    assert 'metalserve_autoscaler_errors_total{kind="haproxy"} 1.0' in text
    assert _weights(lab.api)["gpu1-1"] == 0


def test_the_command_runs_bounded_and_logs_its_decisions(lab: Lab) -> None:
    lab.load.update({"gpu1-0": 30, "gpu2-0": 30, "gpu1-1": 0, "gpu2-1": 0})
    result = run_cli(
        "autoscale", "--prometheus-url", lab.prometheus, "--haproxy-socket", str(lab.socket),
        "--backend", BACKEND,
        "--scale-up-at", "10", "--scale-down-at", "4", "--up-after", "2", "--interval", "0.1",
        "--metrics-port", "0", "--max-evaluations", "3",
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "promote metalserve_replicas/gpu1-1 (weight 100): load 30.0" in result.stderr
    assert "HTTP Request" not in result.stderr  # httpx's line per query stays out of the journal
    assert _weights(lab.api)["gpu1-1"] == 100


def test_runs_on_a_load_balancer_without_the_serving_stack(tmp_path: Path) -> None:
    """The load balancers' CLI venv (role metalserve_cli) has httpx, pydantic-settings and
    prometheus-client, not torch, transformers or the server."""
    blocked = ["torch", "transformers", "fastapi", "uvicorn", "safetensors"]
    program = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # any import of them now fails\n"
        "from metalserve.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [
            sys.executable, "-c", program, "autoscale", "--prometheus-url", "http://127.0.0.1:9",
            "--haproxy-socket", str(tmp_path / "none.sock"), "--backend", "metalserve_replicas",
            "--max-evaluations", "1",
            "--metrics-port", "0",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "cannot read metalserve_replicas's servers" in result.stderr


class _Replayed(haproxy.RuntimeAPI):
    """The runtime API answering with a recorded answer (a real one, cut short)."""

    def __init__(self, answer: str) -> None:
        super().__init__(Path("/nonexistent"))
        self.answer = answer

    def command(self, line: str) -> str:
        return self.answer


def test_a_cut_answer_is_an_error_not_a_crash(lab: Lab) -> None:
    """A ``show servers state`` answer cut inside a line (a reload closing the socket) and a
    malformed query result become the errors the controller holds on, not exceptions that
    would stop the service."""
    answer = lab.api.command(f"show servers state {BACKEND}").rstrip("\n")
    *lines, last = answer.splitlines()
    cut = "\n".join([*lines, " ".join(last.split()[:6])])  # the last line loses its port, weights
    with pytest.raises(haproxy.RuntimeAPIError, match="unexpected server line"):
        _Replayed(cut).servers(BACKEND)
    assert len(_Replayed(answer).servers(BACKEND)) == 4

    def malformed(_request: httpx.Request) -> httpx.Response:
        body = {"status": "success", "data": {"resultType": "vector", "result": [{"value": []}]}}
        return httpx.Response(200, json=body)

    client = httpx.Client(base_url="http://p", transport=httpx.MockTransport(malformed))
    with client, pytest.raises(prometheus.PrometheusError, match="unexpected result"):
        prometheus.query(client, "up")
