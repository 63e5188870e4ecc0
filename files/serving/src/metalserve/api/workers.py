"""A replica's other API processes (``serve --api-processes N``), as vLLM's ``--api-server-count``.

With the engine in a process of its own, one API process's event loop parses, tokenizes and
streams every request: at 850M on an H100, 32 streams' tokens every 1.1 ms kept it busy enough
that a wave of requests waited for it (BENCHMARKS round 2 step 23). N API processes share the
listening socket (the kernel hands each connection to one of them) and the engine's process
(each its own socket to it, ``metalserve.core``).

The first API process is the replica as without them: it loads versions, answers probes,
``/version``, ``/metrics`` and the admin API, drains on SIGTERM and tells systemd. Each other
one (``main`` here, started by the first: ``ApiWorkers``) serves the
inference routes itself and hands every other request to the first over a Unix socket, so
that each answer has one source: the replica's readiness, its version, its reloads. The first
one's metrics include the others' requests (their counters, histograms and in-flight count,
read from them at each scrape). The replica ends when any of them ends unasked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from metalserve import sdnotify
from metalserve.core.spawn import EngineProcess
from metalserve.settings import ServeSettings

log = logging.getLogger(__name__)

# The routes the other API processes serve themselves; the first one answers every other.
SERVED_BY_EACH = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})
# Another API process's start: ``main`` below, with the file descriptors of its control socket,
# its socket to the engine's process and the port's listening socket.
WORKER_MAIN = "import sys; from metalserve.api.workers import main; sys.exit(main())"
# How long a scrape waits for one other API process's metrics.
METRICS_SECONDS = 2.0
# How long the others may take to end beyond their drain (uvicorn's graceful shutdown).
STOP_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class WorkerHello:
    """First API process -> another, first: what to serve and where the first one listens."""

    settings: ServeSettings
    version_id: str
    index: int
    first_socket: str


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    control: Connection
    lock: threading.Lock


class ApiWorkers:
    """The first API process's side: the others, started, watched, scraped and drained."""

    def __init__(
        self,
        settings: ServeSettings,
        version_id: str,
        engine: EngineProcess,
        listener: socket.socket,
        on_lost: Callable[[str], None],
    ) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="metalserve-api-"))
        path = self._dir / "first.sock"
        # Where the others hand this one what they do not serve: only this user may connect.
        self.first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.first.bind(str(path))
        path.chmod(0o600)
        self.listener = listener
        self._on_lost = on_lost
        self._stopping = False
        self._workers: list[_Worker] = []
        env = {k: v for k, v in os.environ.items() if k not in sdnotify.ENV_VARIABLES}
        for index, engine_end in enumerate(engine.others, start=1):
            ours, theirs = socket.socketpair()
            fds = (theirs.fileno(), engine_end.fileno(), listener.fileno())
            process = subprocess.Popen(
                # Not ``-m`` this module: the package imports it first (runpy warns of that).
                [sys.executable, "-P", "-c", WORKER_MAIN, *map(str, fds)],
                pass_fds=fds,
                env=env,
            )
            theirs.close()
            engine_end.close()
            control = Connection(ours.detach())
            control.send(WorkerHello(settings, version_id, index, str(path)))
            worker = _Worker(index, process, control, threading.Lock())
            self._workers.append(worker)
            watch = threading.Thread(
                target=self._watch, args=(worker,), name=f"metalserve-api-{index}", daemon=True
            )
            watch.start()
        engine.others.clear()
        log.info(
            "%d more API processes: %s",
            len(self._workers),
            ", ".join(str(w.process.pid) for w in self._workers),
        )

    def _watch(self, worker: _Worker) -> None:
        code = worker.process.wait()
        if not self._stopping:
            self._on_lost(f"API process {worker.index} (pid {worker.process.pid}) ended: {code}")

    def metrics(self) -> list[bytes]:
        """Each other API process's metrics, in Prometheus' text format (one that does not
        answer in time is left out, and said so)."""
        texts = []
        for worker in self._workers:
            with worker.lock:
                try:
                    worker.control.send("metrics")
                    if worker.control.poll(METRICS_SECONDS):
                        texts.append(worker.control.recv_bytes())
                        continue
                except (OSError, EOFError):
                    pass
            log.warning("API process %d did not send its metrics", worker.index)
        return texts

    def drain(self) -> None:
        """Each other API process drains too (SIGTERM): refuses new requests, ends its own."""
        self._stopping = True
        for worker in self._workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> bool:
        """Until every other API process ended; False on timeout."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(asyncio.to_thread(w.process.wait) for w in self._workers)),
                timeout,
            )
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """After the first API process stopped serving (drained, or failed): the others are
        asked to end, and killed where they do not in time."""
        self.drain()
        for worker in self._workers:
            try:
                worker.process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                log.error("API process %d did not end: killed", worker.index)
                worker.process.kill()
                worker.process.wait()
            worker.control.close()
        self.first.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _answer_metrics(control: Connection, render: Callable[[], bytes]) -> None:
    """Another API process's control thread: its metrics when asked; at the first one's end
    (EOF) this process ends too (nobody is left to answer its probes or stop the engine)."""
    while True:
        try:
            control.recv()
        except (EOFError, OSError):
            log.critical("the first API process is gone: this process ends")
            os._exit(1)
        with contextlib.suppress(OSError):
            control.send_bytes(render())


def main() -> int:
    """Another API process (``WORKER_MAIN``)."""
    from metalserve import server
    from metalserve.logs import configure_logging

    control_fd, engine_fd, listen_fd = (int(arg) for arg in sys.argv[-3:])
    for fd in (control_fd, engine_fd, listen_fd):
        os.set_inheritable(fd, False)
    control = Connection(control_fd)
    try:
        hello: WorkerHello = control.recv()
    except EOFError:
        return 0
    settings = hello.settings
    configure_logging(settings.log_level, settings.log_format)
    # httpx logs each request it sends at info: every probe handed to the first API process.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    listener = socket.socket(fileno=listen_fd)
    return server.run_worker(
        settings,
        hello.version_id,
        hello.index,
        engine=Connection(engine_fd),
        listener=listener,
        first_socket=hello.first_socket,
        serve_control=lambda render: threading.Thread(
            target=_answer_metrics, args=(control, render), name="metalserve-control", daemon=True
        ).start(),
    )
