"""Role model_replica's systemd units for replicas over one GPU and over several: rendered by the
role's own templates (tests/fixtures/model_replica/render.yml) and checked by systemd-analyze;
its readiness wait against replica stand-ins (tests/fixtures/model_replica/wait_ready.yml)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from repo_helpers import REPO, run_playbook

sys.path.insert(0, str(REPO / "roles" / "model_replica" / "filter_plugins"))

from metalserve_gpus import metalserve_gpu_groups


def render(tmp_path: Path, **settings: object) -> Path:
    out = tmp_path / "units"
    out.mkdir()
    # The unit's ExecStart: systemd-analyze verify wants an executable there.
    prefix = tmp_path / "prefix"
    (prefix / "venv/bin").mkdir(parents=True)
    (prefix / "venv/bin/metalserve").write_text("#!/bin/sh\n")
    (prefix / "venv/bin/metalserve").chmod(0o755)
    extra = {
        "ansible_python_interpreter": sys.executable,
        "render_dir": str(out),
        "metalserve_prefix": str(prefix),
        **settings,
    }
    result = run_playbook(
        "tests/fixtures/model_replica/render.yml", "localhost,", "-c", "local", "--extra-vars", json.dumps(extra)
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return out


def environment(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def verify(units: Path, instance: int) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify of one instance, with its drop-ins, from the rendered directory."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (package systemd)")
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"}
    return subprocess.run(
        ["systemd-analyze", "verify", f"{units}/metalserve@.service", f"metalserve@{instance}.service"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_a_replica_over_two_gpus_gets_its_gpus_its_ranks_and_only_their_devices(tmp_path: Path) -> None:
    units = render(
        tmp_path,
        model_replica_device="cuda",
        model_replica_gpus_per_replica=2,
        model_replica_instances=2,
    )
    second = environment(units / "replica-1.env")
    assert second["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert second["METALSERVE_DEVICE"] == "cuda"
    assert second["METALSERVE_TENSOR_PARALLEL"] == "2"
    assert environment(units / "replica-0.env")["CUDA_VISIBLE_DEVICES"] == "0,1"
    unit = (units / "metalserve@.service").read_text()
    assert "DeviceAllow=/dev/nvidia%i" not in unit
    dropin = (units / "metalserve@1.service.d/gpus.conf").read_text()
    assert [line for line in dropin.splitlines() if line.startswith("DeviceAllow=")] == [
        "DeviceAllow=/dev/nvidia2 rw",
        "DeviceAllow=/dev/nvidia3 rw",
    ]
    result = verify(units, 1)
    # systemd ignores a bad line with a warning only: none may be printed.
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_a_replica_over_one_gpu_keeps_its_own_gpu_and_no_drop_in(tmp_path: Path) -> None:
    units = render(tmp_path, model_replica_device="cuda", model_replica_instances=2)
    second = environment(units / "replica-1.env")
    assert second["CUDA_VISIBLE_DEVICES"] == "1"
    assert second["METALSERVE_DEVICE"] == "cuda:0"
    assert "METALSERVE_TENSOR_PARALLEL" not in second
    # The server's default (the engine in a process of its own, on CUDA with one rank) ...
    assert "METALSERVE_ENGINE_PROCESS" not in second
    unit = (units / "metalserve@.service").read_text()
    assert "DeviceAllow=/dev/nvidia%i rw" in unit
    # ... whose stop the unit waits for: the drain's 30 s, up to 10 s, a 15 s margin.
    assert "TimeoutStopSec=55" in unit.splitlines()
    assert not list(units.glob("*.service.d"))
    result = verify(units, 1)
    # systemd ignores a bad line with a warning only: none may be printed.
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


@pytest.mark.parametrize(
    ("settings", "env", "stop"),
    [
        ({"model_replica_device": "cpu"}, None, 45),  # the server's default there: one process
        ({"model_replica_device": "cpu", "model_replica_engine_process": True}, "true", 55),
        ({"model_replica_device": "cuda", "model_replica_engine_process": False}, "false", 45),
        # Several GPUs a replica: its ranks run the engine beside HTTP.
        ({"model_replica_device": "cuda", "model_replica_gpus_per_replica": 2}, None, 45),
    ],
)
def test_the_engine_process_setting_and_the_stop_it_needs(
    tmp_path: Path, settings: dict[str, object], env: str | None, stop: int
) -> None:
    units = render(tmp_path, **settings)
    assert environment(units / "replica-0.env").get("METALSERVE_ENGINE_PROCESS") == env
    assert f"TimeoutStopSec={stop}" in (units / "metalserve@.service").read_text().splitlines()


@pytest.mark.parametrize(("processes", "env"), [(1, None), (3, "3")])
def test_several_api_processes_reach_the_server(tmp_path: Path, processes: int, env: str | None) -> None:
    units = render(tmp_path, model_replica_device="cuda", model_replica_api_processes=processes)
    assert environment(units / "replica-0.env").get("METALSERVE_API_PROCESSES") == env


def test_a_replica_gets_gpus_with_nvlink_to_each_other_on_one_numa_node(tmp_path: Path) -> None:
    """The hardware fact's topology (NVLink bridges across cards 0-2 and 1-3, two NUMA nodes)
    picks each instance's GPUs, in its environment and its drop-in alike."""
    hardware = {
        "gpu_count": 4,
        "gpu_nvlink_peers": [[2], [3], [0], [1]],
        "gpus": [{"numa_node": i % 2} for i in range(4)],
    }
    units = render(
        tmp_path,
        model_replica_device="cuda",
        model_replica_gpus_per_replica=2,
        ansible_local={"metalserve_hardware": hardware},
    )
    assert environment(units / "replica-0.env")["CUDA_VISIBLE_DEVICES"] == "0,2"
    assert environment(units / "replica-1.env")["CUDA_VISIBLE_DEVICES"] == "1,3"
    dropin = (units / "metalserve@1.service.d/gpus.conf").read_text()
    assert [line for line in dropin.splitlines() if line.startswith("DeviceAllow=")] == [
        "DeviceAllow=/dev/nvidia1 rw",
        "DeviceAllow=/dev/nvidia3 rw",
    ]


MESH = [[j for j in range(8) if j != i] for i in range(8)]


@pytest.mark.parametrize(
    ("count", "size", "peers", "numa", "groups"),
    [
        pytest.param(8, 4, MESH, [0] * 4 + [1] * 4, [[0, 1, 2, 3], [4, 5, 6, 7]], id="nvswitch"),
        pytest.param(8, 2, None, None, [[0, 1], [2, 3], [4, 5], [6, 7]], id="nothing-known"),
        pytest.param(4, 2, [[2], [3], [0], [1]], None, [[0, 2], [1, 3]], id="bridges-across"),
        pytest.param(4, 2, None, [0, 1, 0, 1], [[0, 2], [1, 3]], id="numa-only"),
        # NVLink wins over NUMA when both cannot hold.
        pytest.param(4, 2, [[1], [0], [3], [2]], [0, 1, 0, 1], [[0, 1], [2, 3]], id="nvlink-over-numa"),
        # No NVLink at all (PCIe only): contiguous, not no replica.
        pytest.param(4, 2, [[], [], [], []], [0, 0, 0, 0], [[0, 1], [2, 3]], id="pcie-only"),
        pytest.param(5, 2, None, None, [[0, 1], [2, 3]], id="a-gpu-left-over"),
        pytest.param(3, 1, None, None, [[0], [1], [2]], id="one-each"),
    ],
)
def test_gpu_groups(
    count: int, size: int, peers: list[list[int]] | None, numa: list[int] | None, groups: list[list[int]]
) -> None:
    assert metalserve_gpu_groups(count, size, nvlink_peers=peers, numa_nodes=numa) == groups


class Readiness(http.server.BaseHTTPRequestHandler):
    """/readyz: 503 until the server's ``ready_at`` (monotonic seconds; None: never), then 200."""

    def do_GET(self) -> None:
        ready_at = self.server.ready_at  # type: ignore[attr-defined]
        ready = ready_at is not None and time.monotonic() >= ready_at
        self.send_response(200 if ready else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def replica_urls() -> Iterator[Callable[..., list[str]]]:
    """Replica stand-ins, each ready after the given seconds (None: never)."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(*ready_after: float | None) -> list[str]:
        for seconds in ready_after:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Readiness)
            server.daemon_threads = True
            server.ready_at = None if seconds is None else time.monotonic() + seconds  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        return [f"http://127.0.0.1:{s.server_address[1]}" for s in servers[-len(ready_after) :]]

    yield start
    for server in servers:
        server.shutdown()


def wait_ready(urls: list[str], timeout: int) -> tuple[subprocess.CompletedProcess[str], float]:
    extra = {
        "ansible_python_interpreter": sys.executable,
        "model_replica_wait_urls": urls,
        "model_replica_ready_timeout": timeout,
        "metalserve_replica_mtls": False,  # plain HTTP stand-ins
    }
    started = time.monotonic()
    result = run_playbook(
        "tests/fixtures/model_replica/wait_ready.yml", "localhost,", "-c", "local", "--extra-vars", json.dumps(extra)
    )
    return result, time.monotonic() - started


def test_the_readiness_wait_passes_once_every_replica_is_ready(replica_urls: Callable[..., list[str]]) -> None:
    result, _ = wait_ready(replica_urls(0, 3), timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_replicas_that_never_get_ready_fail_the_wait_by_one_deadline(replica_urls: Callable[..., list[str]]) -> None:
    """Three replicas that never answer 200 fail the wait once its one timeout is spent, not
    after one timeout each (and each try's own time) as when every URL had its own retries."""
    timeout = 10
    result, seconds = wait_ready(replica_urls(None, None, None), timeout=timeout)
    assert result.returncode != 0
    assert "Wait until every replica is ready" in result.stdout
    assert result.stdout.count('"status": 503') >= 3, result.stdout[-3000:]
    assert seconds < 2 * timeout, f"the wait took {seconds:.0f} s for a {timeout} s timeout"
