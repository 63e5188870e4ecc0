"""Run a replica under uvicorn, with our own SIGTERM handling (drain before exit).

uvicorn's own handling stops listening at once. A replica behind HAProxy must instead keep
answering: ``/readyz`` turns 503 immediately (so the health check takes it out of rotation), new
inference requests get 503, requests in flight finish, and only then does uvicorn shut down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from metalserve.api import Replica, create_app
from metalserve.exitcodes import ExitCode
from metalserve.settings import ServeSettings

log = logging.getLogger(__name__)

# After the drain, how long uvicorn may take to flush responses and close connections.
GRACEFUL_SHUTDOWN_SECONDS = 5
# After aborting requests at the drain timeout, how long their handlers get to answer.
ABORT_GRACE_SECONDS = 2.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of stopping at once.

    A second signal stops at once (a third SIGINT forces the exit, as in uvicorn).
    """

    def __init__(self, config: uvicorn.Config, replica: Replica) -> None:
        super().__init__(config)
        self.replica = replica
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None

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
        log.info("received %s: draining", signal.Signals(sig).name)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="metalserve-drain")
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        replica = self.replica
        timeout = replica.settings.drain_timeout
        log.info("waiting up to %.1fs for %d in-flight requests", timeout, replica.in_flight)
        if not await replica.wait_idle(timeout):
            log.warning("drain timeout: aborting %d in-flight requests", replica.in_flight)
            replica.engine.abort_all("the server shut down before the request finished")
            await replica.wait_idle(ABORT_GRACE_SECONDS)
        log.info("drained; shutting down")
        self.should_exit = True


def run(settings: ServeSettings, version_id: str) -> int:
    """Serve until drained or failed; return the process exit code."""
    replica = Replica(settings, version_id)
    app = create_app(settings, replica)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the process-wide logging set up by the CLI
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        server_header=False,
    )
    server = DrainingServer(config, replica)

    def stop_now() -> None:
        server.should_exit = True

    replica.on_fatal = stop_now
    server.run()
    if replica.failure is not None:
        return int(replica.exit_code)
    return int(ExitCode.OK)
