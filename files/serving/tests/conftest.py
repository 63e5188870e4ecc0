"""Shared fixtures: tiny models, a model store, and real ``metalserve serve`` processes.

Server fixtures start the actual console script on a free loopback port and talk to it over HTTP;
nothing end-to-end goes through an in-process test client. Every test that starts its own server
builds the arguments with ``serve_args``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from hypothesis import configuration as hypothesis_configuration
from hypothesis import settings as hypothesis_settings
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from metalserve.engine import Engine
    from metalserve.loader import LoadedModel

# Hypothesis keeps caches in ./.hypothesis by default: keep them out of the repository.
hypothesis_configuration.set_hypothesis_home_dir(
    Path(tempfile.gettempdir()) / "metalserve-hypothesis"
)
# No per-example deadline: `make test` runs these beside molecule's nodes on two cores, where a
# stall of 200 ms (hypothesis' default) says nothing about the code under test.
hypothesis_settings.register_profile(
    "metalserve", parent=hypothesis_settings.default, deadline=None
)
hypothesis_settings.load_profile("metalserve")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

METALSERVE = str(Path(sys.executable).with_name("metalserve"))
MODEL = "tiny"
ADMIN_TOKEN = "test-admin-token-0123456789"
SERVER_START_TIMEOUT = 90.0
# The suite runs on CPU; on a GPU machine METALSERVE_TEST_DEVICE=cuda:0 runs the servers there.
TEST_DEVICE = os.environ.get("METALSERVE_TEST_DEVICE", "cpu")
TEST_DTYPE = os.environ.get("METALSERVE_TEST_DTYPE", "auto")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METALSERVE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METALSERVE_")}
    # Two cores are shared by several servers and pytest: one torch thread each.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


@dataclass
class Server:
    """A ``metalserve serve`` subprocess."""

    args: list[str]
    log_path: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=server_env)
    proc: subprocess.Popen[bytes] | None = None
    # (seconds since start, /readyz status or None while the port is closed)
    readiness: list[tuple[float, int | None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    METALSERVE,
                    "serve",
                    "--port",
                    str(self.port),
                    "--host",
                    "127.0.0.1",
                    "--device",
                    TEST_DEVICE,
                    "--dtype",
                    TEST_DTYPE,
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    def poll(self, client: httpx.Client, started: float) -> bool:
        """Record one /readyz observation; True once it answers 200."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            status: int | None = client.get(f"{self.url}/readyz").status_code
        except httpx.TransportError:
            status = None
        self.readiness.append((time.monotonic() - started, status))
        return status == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def wait_all_ready(*servers: Server, timeout: float = SERVER_START_TIMEOUT) -> None:
    """Poll every server's /readyz from the start, recording each one's readiness timeline."""
    started = time.monotonic()
    pending = list(servers)
    with httpx.Client(timeout=2.0) as client:
        while pending:
            if time.monotonic() - started > timeout:
                logs = "\n".join(s.log() for s in pending)
                raise TimeoutError(f"servers not ready after {timeout}s:\n{logs}")
            pending = [s for s in pending if not s.poll(client, started)]
            time.sleep(0.05)


@dataclass(frozen=True)
class Store:
    root: Path
    v1: str  # seed 1
    v2: str  # seed 2
    corrupt: str  # seed 3, model.safetensors altered after publishing
    sources: dict[int, Path]


def serve_args(
    store: Store, *, version: str | None = None, **flags: str | float | Path | bool
) -> list[str]:
    """``metalserve serve`` arguments for a ``Server``: the store's model at ``version`` (default
    v1), then one flag per keyword: ``drain_timeout=1`` is ``--drain-timeout 1``, True a bare
    flag (``no_access_log=True``), False none."""
    args = ["--store", str(store.root), "--model", MODEL, "--version", version or store.v1]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    from metalserve.tiny_model import make_tiny_model

    base = tmp_path_factory.mktemp("models")
    dirs = {}
    for seed in (1, 2, 3):
        make_tiny_model(base / f"seed{seed}", seed=seed)
        dirs[seed] = base / f"seed{seed}"
    return dirs


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[int, Path]) -> Store:
    from metalserve import store

    root = tmp_path_factory.mktemp("store")
    v1 = store.publish(model_dirs[1], root, MODEL)
    v2 = store.publish(model_dirs[2], root, MODEL)
    corrupt = store.publish(model_dirs[3], root, MODEL)
    corrupt_weights(store.version_dir(root, MODEL, corrupt) / "model.safetensors")
    return Store(root=root, v1=v1, v2=v2, corrupt=corrupt, sources=model_dirs)


@pytest.fixture(scope="session")
def v1(model_store: Store) -> LoadedModel:
    from metalserve.loader import load_version

    return load_version(model_store.root, MODEL, model_store.v1)


@pytest.fixture(scope="session")
def v2(model_store: Store) -> LoadedModel:
    from metalserve.loader import load_version

    return load_version(model_store.root, MODEL, model_store.v2)


def corrupt_weights(path: Path) -> None:
    """Flip one byte in the middle of the file (inside tensor data), keeping its size."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def admin_token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "admin-token"
    path.write_text(ADMIN_TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def servers(
    model_store: Store, admin_token_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    """Two long-lived replicas, started together to overlap their start-up.

    "api": version 1, no admin token, small limits (API, batching, fuzzing, metrics).
    "reload": version 1, with an admin token and a profile directory (reload, profile and
    consistency tests).
    """
    logs = tmp_path_factory.mktemp("server-logs")
    api = Server(
        serve_args(
            model_store,
            version=model_store.v1[:12],  # a prefix, resolved by the CLI
            no_access_log=True,
            max_batch_size=8,
            max_new_tokens=64,
            max_prompt_tokens=256,
        ),
        logs / "api.log",
    )
    reload_server = Server(
        serve_args(
            model_store,
            no_access_log=True,
            max_new_tokens=64,
            admin_token_file=admin_token_file,
            profile_dir=logs / "profiles",
        ),
        logs / "reload.log",
    )
    started = {"api": api.start(), "reload": reload_server.start()}
    try:
        wait_all_ready(*started.values())
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def engine(v1: LoadedModel) -> Iterator[Engine]:
    """A started engine serving v1, up to 4 sequences per batch."""
    from metalserve.engine import Engine

    eng = Engine(max_batch_size=4)
    eng.start()
    eng.swap(v1).result(timeout=10)
    yield eng
    eng.stop()


@pytest.fixture(scope="session")
def api_server(servers: dict[str, Server]) -> Server:
    return servers["api"]


@pytest.fixture(scope="session")
def reload_server(servers: dict[str, Server]) -> Server:
    return servers["reload"]


@pytest.fixture
def client(api_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_server.url, timeout=30.0) as http:
        yield http


# --- talking to a server ----------------------------------------------------------------------

GREEDY: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_tokens": 12, "ignore_eos": True}


def complete(client: httpx.Client, prompt: str | list[Any], **extra: Any) -> dict[str, Any]:
    response = client.post("/v1/completions", json={**GREEDY, "prompt": prompt, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
