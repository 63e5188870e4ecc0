"""systemd notifications and the watchdog pinger, against a real unix datagram socket.

The socket stands in for systemd's: bound in a temporary directory (or the abstract namespace),
passed as NOTIFY_SOCKET, read by a thread that timestamps every datagram.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import (
    ADMIN_TOKEN,
    MODEL,
    Server,
    Store,
    serve_args,
    server_env,
    wait_all_ready,
)
from metalserve.engine import Engine, Event, Failed, Finished, Sequence
from metalserve.loader import LoadedModel
from metalserve.sampling import SamplingParams
from metalserve.sdnotify import Notifier, Watchdog, socket_address, watchdog_interval


class Receiver:
    """A bound AF_UNIX datagram socket and the messages that reached it, with arrival times."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self.sock.close()

    def lines(self, since: float = 0.0) -> list[tuple[float, str]]:
        return [(t, line) for t, m in list(self.messages) if t >= since for line in m.split("\n")]

    def times(self, line: str, since: float = 0.0) -> list[float]:
        return [t for t, got in self.lines(since) if got == line]

    def statuses(self, since: float = 0.0) -> list[str]:
        return [got.removeprefix("STATUS=") for _, got in self.lines(since) if got[:7] == "STATUS="]

    def wait_for(self, line: str, timeout: float, since: float = 0.0) -> float:
        """Arrival time of the first ``line`` after ``since``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.times(line, since)
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no {line!r} within {timeout}s; got {self.lines(since)}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    # Short: a unix socket path has at most 107 bytes, pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(prefix="ms-notify-")
    recv = Receiver(str(Path(directory) / "notify.sock"))
    try:
        yield recv
    finally:
        recv.close()
        shutil.rmtree(directory, ignore_errors=True)


def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --- the protocol ---------------------------------------------------------------------------


def test_socket_addresses() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@private/notify") == "\0private/notify"
    assert socket_address("vsock:2:1234") is None


def test_environment_is_read_then_unset() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environ(env)
    assert notifier.enabled
    assert notifier.address == "/run/x"
    assert notifier.watchdog_interval == 3.0
    assert env == {}, "child processes must not inherit systemd's variables"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready("x") is False
    assert notifier.ping() is False
    assert notifier._sock is None, "no socket is even created"


def test_sends_to_a_socket_path(receiver: Receiver) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": receiver.address})
    assert notifier.ready("loading tiny")
    assert notifier.ping()
    receiver.wait_for("WATCHDOG=1", timeout=5)
    notifier.close()
    assert [m for _, m in receiver.messages] == ["READY=1\nSTATUS=loading tiny", "WATCHDOG=1"]


def test_sends_to_an_abstract_socket() -> None:
    name = f"metalserve-test-{uuid.uuid4().hex}"
    recv = Receiver("\0" + name)
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.stopping("draining")
        recv.wait_for("STOPPING=1", timeout=5)
        assert recv.statuses() == ["draining"]
        notifier.close()
    finally:
        recv.close()


def test_a_missing_socket_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"), watchdog_interval=1.0)
    assert notifier.ping() is False
    assert notifier.ping() is False
    notifier.close()


# --- the watchdog over a real engine ----------------------------------------------------------

INTERVAL = 1.0  # WatchdogSec: stale after 0.5 s, pings every 0.25 s, checks every 0.125 s
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


class Gate:
    """A sequence sink that blocks the engine thread (inside a real step) until opened."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.reached.set()
        self.opened.wait(30)


@pytest.fixture
def engine(v1: LoadedModel) -> Iterator[Engine]:
    eng = Engine(max_batch_size=2, idle_wait=INTERVAL / 8, step_delay=0.02)
    eng.start()
    eng.swap(v1).result(timeout=10)
    yield eng
    eng.stop()


@pytest.fixture
def watchdog(receiver: Receiver, engine: Engine) -> Iterator[Watchdog]:
    dog = Watchdog(
        Notifier(receiver.address, watchdog_interval=INTERVAL),
        progress_age=engine.heartbeat_age,
        status=lambda: "testing",
    )
    dog.start()
    yield dog
    dog.stop()
    dog.notifier.close()


def submit(engine: Engine, bundle: LoadedModel, sink: Callable[[Event], None]) -> None:
    ids = bundle.encode("The engine loop", add_special_tokens=True)
    engine.submit(Sequence(bundle=bundle, prompt_ids=ids, params=GREEDY, sink=sink))


def gaps(times: list[float], start: float, end: float) -> float:
    """The longest stretch of [start, end] without any of ``times``."""
    inside = [start, *(t for t in times if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(inside))


def test_pings_while_idle_and_busy_none_while_a_step_is_wedged(
    receiver: Receiver, watchdog: Watchdog, engine: Engine, v1: LoadedModel
) -> None:
    start = time.monotonic()
    time.sleep(1.5)
    idle = receiver.times("WATCHDOG=1", start)
    assert len(idle) >= 4, f"idle engine: {len(idle)} pings in 1.5s"
    # Pings every 0.25 s, looked for every 0.125 s: a gap of 0.75 s would be a pause.
    assert gaps(idle, start, time.monotonic()) < 0.75

    done = threading.Event()

    def collect(event: Event) -> None:
        if isinstance(event, Finished | Failed):
            done.set()

    busy_from = time.monotonic()
    submit(engine, v1, collect)
    assert done.wait(30)
    busy_until = time.monotonic()
    assert busy_until - busy_from > 0.5, "the generation should keep the engine busy a while"
    busy = receiver.times("WATCHDOG=1", busy_from)
    assert gaps(busy, busy_from, busy_until) < 0.75, "pings go on while generating"

    gate = Gate()
    submit(engine, v1, gate)
    assert gate.reached.wait(10), "the engine thread never reached the gate"
    wedged_at = time.monotonic()
    time.sleep(2.5)
    try:
        assert watchdog.stale_after is not None
        stale_after = wedged_at + watchdog.stale_after + watchdog.check_every + 0.5
        late = [t for t in receiver.times("WATCHDOG=1", wedged_at) if t > stale_after]
        assert late == [], f"pings {[round(t - wedged_at, 2) for t in late]} s into the wedge"
        assert engine.is_alive(), "wedged, not dead"
        assert any("stalled" in s for s in receiver.statuses(wedged_at))
    finally:
        gate.opened.set()
    resumed = receiver.wait_for("WATCHDOG=1", timeout=2, since=time.monotonic())
    assert resumed - wedged_at > 2.5


def test_no_pings_once_the_engine_thread_died(
    receiver: Receiver, watchdog: Watchdog, engine: Engine, v1: LoadedModel
) -> None:
    receiver.wait_for("WATCHDOG=1", timeout=2)
    # A token id past the vocabulary fails the embedding lookup: three failed steps in a row
    # end the engine thread (MAX_CONSECUTIVE_FAILURES), as a broken device would.
    for _ in range(3):
        failed = threading.Event()
        engine.submit(
            Sequence(
                bundle=v1,
                prompt_ids=[v1.vocab_size + 7],
                params=GREEDY,
                sink=lambda e, failed=failed: failed.set() if isinstance(e, Failed) else None,
            )
        )
        assert failed.wait(10)
    wait_until(lambda: not engine.is_alive(), timeout=10)
    died_at = time.monotonic()
    time.sleep(1.5)
    late = receiver.times("WATCHDOG=1", died_at + watchdog.check_every + 0.5)
    assert late == [], f"{len(late)} pings after the engine thread died"
    assert "stalled" in receiver.statuses()[-1]


# --- a real server under a stand-in systemd -----------------------------------------------------

SERVER_INTERVAL = 4.0  # WATCHDOG_USEC of the server: stale after 2 s, pings every 1 s
WEDGE_SECONDS = 8.0


@pytest.mark.e2e
@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_server_notifies_ready_pings_and_stops(
    receiver: Receiver,
    model_store: Store,
    admin_token_file: Path,
    tmp_path: Path,
    engine_process: bool,
) -> None:
    """With the engine in a process of its own, its heartbeat comes over the socket: the pings
    stop while it is wedged there too. Once they are withheld, the engine's stack is in the
    log (its process's, there), before any kill."""
    env = server_env()
    env.update(NOTIFY_SOCKET=receiver.address, WATCHDOG_USEC=str(int(SERVER_INTERVAL * 1e6)))
    server = Server(
        serve_args(
            model_store,
            admin_token_file=admin_token_file,
            fault_injection=True,
            engine_process=engine_process,
            debug_step_delay=0.5,  # the warm-up takes > 2 s: READY=1 comes before /readyz turns 200
        ),
        tmp_path / "notify.log",
        env=env,
    ).start()
    assert server.proc is not None
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            receiver.wait_for("READY=1", timeout=60)
            loading = client.get("/readyz")
            assert loading.status_code == 503, "systemd's start must not wait for the weights"
            assert client.get("/healthz").status_code == 200
            assert receiver.statuses()[0] == f"loading {MODEL}@{model_store.v1[:12]}"
            assert receiver.messages[0][1].startswith("READY=1\nSTATUS=loading ")

            wait_all_ready(server)
            ready_at = time.monotonic()
            wait_until(lambda: f"serving {MODEL}@{model_store.v1[:12]}" in receiver.statuses(), 5)
            time.sleep(5)  # idle: the engine loop beats from its bounded idle waits
            pings = receiver.times("WATCHDOG=1", ready_at)
            assert len(pings) >= 3, f"{len(pings)} pings in 5 s"
            # Pings every 1 s, looked for every 0.5 s: a 2.5 s gap is a pause.
            assert gaps(pings, ready_at, ready_at + 5) < 2.5

            asked_at = time.monotonic()
            wedged = client.post(
                "/admin/fault/wedge-engine",
                json={"seconds": WEDGE_SECONDS},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            assert wedged.status_code == 200, wedged.text
            wedged_at = time.monotonic()
            assert wedged.json() == {"seconds": WEDGE_SECONDS, "engine": "wedged"}
            assert client.get("/healthz").status_code == 200, "the HTTP side still answers"
            time.sleep(WEDGE_SECONDS + 2)
            silent_from = wedged_at + SERVER_INTERVAL / 2 + 1.5  # stale + a check + margin
            # The wedge starts when the request arrives, before its answer returns: it surely
            # lasts until asked_at + WEDGE_SECONDS (under load, wedged_at + 8 s can be after it).
            during = [
                t for t in receiver.times("WATCHDOG=1", silent_from) if t < asked_at + WEDGE_SECONDS
            ]
            assert during == [], f"pings {[round(t - wedged_at, 1) for t in during]}s into it"
            assert any("stalled" in s for s in receiver.statuses(wedged_at))
            assert receiver.times("WATCHDOG=1", wedged_at + WEDGE_SECONDS), "pings resume"
            # faulthandler's dump: the wedged engine thread's frames, the fault's own among them.
            withheld = server.log().split("watchdog pings withheld", 1)[-1]
            assert "Thread 0x" in withheld, withheld[-3000:]
            assert "in _hold" in withheld, withheld[-3000:]

        server.proc.send_signal(signal.SIGTERM)
        receiver.wait_for("STOPPING=1", timeout=10)
        assert "draining" in receiver.statuses()
        assert server.proc.wait(timeout=20) == 0
    finally:
        server.stop()
