"""Run a replica under uvicorn, with our own SIGTERM handling (drain before exit).

uvicorn's own handling stops listening at once. A replica behind HAProxy must instead keep
answering: ``/readyz`` turns 503 immediately (so the health check takes it out of rotation), new
inference requests get 503, requests in flight finish, and only then does uvicorn shut down.

Under systemd (``$NOTIFY_SOCKET``, ``Type=notify``): ``READY=1`` once the port listens and the
engine thread runs (weights load afterwards; ``/readyz`` tells when traffic may come),
``STATUS=`` lines naming the phase, ``STOPPING=1`` when the drain begins, and ``WATCHDOG=1``
only while the engine loop makes progress (``metalserve.sdnotify``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import FrameType

import uvicorn
from prometheus_client import start_http_server
from starlette.types import ASGIApp

from metalserve import sdnotify, tls
from metalserve.api import create_app
from metalserve.api.app import create_worker_app
from metalserve.api.workers import STOP_GRACE_SECONDS, ApiWorkers
from metalserve.core.spawn import EngineProcess, spawn_engine_process
from metalserve.exitcodes import ExitCode
from metalserve.host import freeze_heap
from metalserve.http_protocol import timed_http_protocol
from metalserve.replica import Replica
from metalserve.settings import ServeSettings

log = logging.getLogger(__name__)

# After the drain, how long uvicorn may take to flush responses and close connections.
GRACEFUL_SHUTDOWN_SECONDS = 5
# After aborting requests at the drain timeout, how long their handlers get to answer.
ABORT_GRACE_SECONDS = 2.0
# How often (in uvicorn's 0.1 s ticks) a renewed TLS certificate is looked for.
TLS_CHECK_TICKS = 50
# uvicorn's main loop sleeps this long between ticks (``Server.main_loop``).
TICK_SECONDS = 0.1


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of stopping at once.

    A second signal stops at once (a third SIGINT forces the exit, as in uvicorn).
    """

    def __init__(
        self,
        config: uvicorn.Config,
        replica: Replica,
        notifier: sdnotify.Notifier | None = None,
        freeze_heap: bool = False,
    ) -> None:
        super().__init__(config)
        self.replica = replica
        self.freeze_heap = freeze_heap
        # Our own record, not gc.get_freeze_count(): whatever else froze objects earlier (the GPU
        # machine's interpreter had 375 frozen at start) made that count non-zero, and the heap
        # was then never frozen (full collections of 0.3-0.4 s at 8B while serving).
        self._heap_frozen = False
        self.notifier = notifier or sdnotify.Notifier(None)
        self.watchdog: sdnotify.Watchdog | None = None
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None
        self.tls_reloader: tls.CertificateReloader | None = None
        # The replica's other API processes (``serve --api-processes``): they drain with it.
        self.workers: ApiWorkers | None = None
        self._last_tick: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.workers is not None and self.started:
            await self._serve_the_others()
        if not self.started or self.should_exit or not self.notifier.enabled:
            return
        replica = self.replica
        if not replica.engine.is_alive():
            log.error("the engine thread is not running: not telling systemd we are ready")
            return
        self.watchdog = sdnotify.Watchdog(
            self.notifier,
            progress_age=replica.engine.heartbeat_age,
            status=lambda: status_line(replica),
            on_withheld=replica.engine.dump_stacks,
        )
        self.watchdog.ready()
        self.watchdog.start()
        if self.notifier.watchdog_interval is not None:
            log.info(
                "systemd watchdog: %.0fs; pinged while the engine loop beats within %.1fs",
                self.notifier.watchdog_interval,
                self.watchdog.stale_after,
            )

    async def _serve_the_others(self) -> None:
        """The other API processes' Unix socket, beside the port: the same app, in plain HTTP
        whether the port is HTTPS or not (they ended the client's TLS already)."""
        assert self.workers is not None
        config = self.config

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
            )

        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            create_protocol, sock=self.workers.first, backlog=config.backlog
        )
        self.servers.append(server)  # closed with the port's at the shutdown

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes: only flip flags here; on_tick (uvicorn's
        # 0.1 s housekeeping in the event loop) starts the drain task.
        if self._drain_requested:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self._drain_requested = True
        self.replica.draining = True  # /readyz answers 503 from this instant
        if self.workers is not None:
            self.workers.drain()  # and the other API processes refuse new requests too
        log.info("received %s: draining", signal.Signals(sig).name)

    async def on_tick(self, counter: int) -> bool:
        # A tick later than its sleep: the loop had that much ready work ahead of the timer.
        # perf_counter, not the loop's clock: uvloop's counts whole milliseconds.
        now = time.perf_counter()
        if self._last_tick is not None:
            late = now - self._last_tick - TICK_SECONDS
            self.replica.metrics.event_loop_lag.observe(max(0.0, late))
        self._last_tick = now
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="metalserve-drain")
        if self.freeze_heap and not self._heap_frozen and self.replica.ready:
            freeze_heap()
            self._heap_frozen = True
        if self.tls_reloader is not None and counter % TLS_CHECK_TICKS == 0:
            self.tls_reloader.check()
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        replica = self.replica
        timeout = replica.settings.drain_timeout
        self.notifier.stopping(status_line(replica))
        log.info("waiting up to %.1fs for %d in-flight requests", timeout, replica.in_flight)
        if not await replica.wait_idle(timeout):
            log.warning("drain timeout: aborting %d in-flight requests", replica.in_flight)
            replica.engine.abort_all("the server shut down before the request finished")
            await replica.wait_idle(ABORT_GRACE_SECONDS)
        # The others' requests are in the engine too: it stops once they are done.
        if self.workers is not None and not await self.workers.wait(
            timeout + ABORT_GRACE_SECONDS + STOP_GRACE_SECONDS
        ):
            log.error("the other API processes did not drain in time")
        log.info("drained; shutting down")
        self.should_exit = True


def status_line(replica: Replica) -> str:
    """The replica's phase in a few words, for systemd's STATUS= (``systemctl status``)."""
    state = replica.state()
    current = replica.engine.model
    if state == "ready" and current is not None:
        line = f"serving {current.name}@{current.short_id}"
        return f"{line}; hot reload in progress" if replica.reload_lock.locked() else line
    if state == "loading":
        return f"loading {replica.settings.model}@{replica.version_id[:12]}"
    if state == "failed":
        return f"failed: {replica.failure}"
    if state == "engine-dead":
        return "the generation engine stopped"
    return state  # draining


def uvicorn_config(
    settings: ServeSettings, app: ASGIApp
) -> tuple[uvicorn.Config, tls.CertificateReloader | None]:
    """uvicorn's settings for the replica's API port, and the TLS certificate's reloader."""
    ssl_context, reloader = None, None
    if settings.tls_certfile is not None and settings.tls_keyfile is not None:
        # Our context, not uvicorn's: TLS 1.2 or later, client certificates when required.
        ssl_context = tls.server_context(
            settings.tls_certfile, settings.tls_keyfile, settings.tls_client_ca
        )
        reloader = tls.CertificateReloader(
            ssl_context, settings.tls_certfile, settings.tls_keyfile, settings.tls_client_ca
        )
        log.info(
            "HTTPS on the API port%s",
            ", client certificates required" if settings.tls_client_ca else "",
        )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the process-wide logging set up by the CLI
        log_level=settings.log_level,
        access_log=False,  # the API middleware writes them, with the request id
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        server_header=False,
        http=timed_http_protocol(settings.request_timeout),
        # Not "auto": a node without uvloop fails here, not silently slower. Under a streaming
        # load asyncio's own loop let 1% of tokens wait 15-21 ms for their event, uvloop 0.9-1.5 ms.
        loop="uvloop",
        ssl_context_factory=None
        if ssl_context is None
        else (lambda _config, _default: ssl_context),
    )
    return config, reloader


def run(
    settings: ServeSettings, version_id: str, engine_process: EngineProcess | None = None
) -> int:
    """Serve until drained or failed; return the process exit code. ``engine_process``: the
    engine's, started already (``cli``), else started here where the settings want one."""
    notifier = sdnotify.Notifier.from_environ()
    if settings.api_processes > 1 and engine_process is None:
        engine_process = spawn_engine_process(settings.api_processes)
    replica = Replica(settings, version_id, engine_process)
    if notifier.watchdog_interval is not None:
        # The heartbeat must advance well within the pinger's freshness limit when idle.
        replica.engine.idle_wait = min(replica.engine.idle_wait, notifier.watchdog_interval / 8)
    app = create_app(settings, replica)
    config, reloader = uvicorn_config(settings, app)
    server = DrainingServer(config, replica, notifier, freeze_heap=True)
    server.tls_reloader = reloader
    replica.metrics.watch_gc()
    sockets = None
    if settings.api_processes > 1:
        assert engine_process is not None
        server.workers = ApiWorkers(
            settings,
            version_id,
            engine_process,
            config.bind_socket(),
            on_lost=lambda why: replica.fatal(ExitCode.API_PROCESS_FAILED, why),
        )
        replica.metrics.add_other_processes(server.workers.metrics)
        sockets = [server.workers.listener]
    if settings.metrics_port is not None:
        # A thread of prometheus_client's: every path there is the metrics, nothing else.
        start_http_server(settings.metrics_port, settings.host, replica.metrics.exposition)
        log.info("metrics alone on %s:%d", settings.host, settings.metrics_port)

    def stop_now() -> None:
        server.should_exit = True

    replica.on_fatal = stop_now
    try:
        server.run(sockets=sockets)
    finally:
        if server.workers is not None:
            server.workers.close()
        if server.watchdog is not None:
            server.watchdog.stop()
        notifier.close()
    if replica.failure is not None:
        return int(replica.exit_code)
    return int(ExitCode.OK)


def run_worker(
    settings: ServeSettings,
    version_id: str,
    index: int,
    *,
    engine: Connection,
    listener: socket.socket,
    first_socket: str,
    serve_control: Callable[[Callable[[], bytes]], None],
) -> int:
    """Another API process of the replica (``metalserve.api.workers``): the inference routes
    on the port the first one shares, until drained (SIGTERM, from the first one)."""
    replica = Replica(settings, version_id, follow=engine)
    replica.api_process = index
    config, reloader = uvicorn_config(settings, create_worker_app(settings, replica, first_socket))
    server = DrainingServer(config, replica, freeze_heap=True)
    server.tls_reloader = reloader
    replica.metrics.watch_gc()
    serve_control(replica.metrics.render)

    def stop_now() -> None:
        server.should_exit = True

    replica.on_fatal = stop_now
    log.info("API process %d (pid %d) on the replica's port", index, os.getpid())
    server.run(sockets=[listener])
    return int(ExitCode.OK)
