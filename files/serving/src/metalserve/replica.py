"""One replica's state, shared by the routes, the background loader and the drain logic.

It decides when the replica may take traffic: loading, ready, failed or draining, with the
engine alive or not. Loads and warm-ups run on daemon threads so that SIGTERM never waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from metalserve import store
from metalserve.core.client import CoreClient, RemoteEngine
from metalserve.core.spawn import EngineProcess
from metalserve.engine import Engine
from metalserve.errors import ApiError
from metalserve.exitcodes import ExitCode
from metalserve.host import ModelHost
from metalserve.loader import LoadError, ModelView
from metalserve.metrics import Metrics
from metalserve.relay import EventRelay
from metalserve.settings import ServeSettings
from metalserve.threads import in_daemon_thread
from metalserve.tracing import Tracing

log = logging.getLogger(__name__)


class Phase(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


def read_token(path: Path | None) -> str | None:
    """The admin bearer token kept in ``path``; None (no admin API) without a file."""
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"admin token file {path} is empty")
    return token


class Replica:
    """State shared by the routes, the background loader and the drain logic."""

    def __init__(
        self,
        settings: ServeSettings,
        version_id: str,
        engine_process: EngineProcess | None = None,
        *,
        follow: Connection | None = None,
    ) -> None:
        """``follow``: another API process's (``metalserve.api.worker``), its socket to the
        engine's process that the first API process started: it serves what that one loads."""
        self.settings = settings
        self.version_id = version_id
        self._created = process_seconds()
        # Which of the replica's API processes this is (``serve --api-processes``; None with one).
        self.api_process: int | None = 0 if settings.api_processes > 1 else None
        self.metrics = Metrics()
        # Read at each scrape, on whichever listener serves it.
        self.metrics.ready.set_function(lambda: 1 if self.ready else 0)
        self.metrics.draining.set_function(lambda: 1 if self.draining else 0)
        self.relay = EventRelay()
        self.admin_token = read_token(settings.admin_token_file)
        # The admin API's hot reloads load the next version beside the live one.
        reload_headroom = self.admin_token is not None
        self.host: ModelHost | CoreClient
        if settings.uses_engine_process:
            self.host = CoreClient(
                settings,
                self.metrics,
                self.relay,
                reload_headroom=reload_headroom,
                spawned=engine_process,
                follow=follow,
            )
            # Each version's tokenizer begun once it is loaded, as ``load_initial`` has the
            # first API process do: a follower makes no calls, it is told.
            if follow is not None:
                self.host.engine.expect_load(_begin_tokenizer)
                self.host.engine.on_live = self._followed
        else:
            self.host = ModelHost(
                settings,
                self.metrics,
                flush_events=self.relay.flush,
                reload_headroom=reload_headroom,
                on_rank_failure=lambda why: self.fatal(ExitCode.RANK_FAILED, why),
            )
        self.engine: Engine | RemoteEngine = self.host.engine
        self.phase = Phase.LOADING
        self.draining = False
        self.exit_code = ExitCode.OK
        self.failure: str | None = None
        self.on_fatal: Callable[[], None] = lambda: None
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self.reload_lock = asyncio.Lock()
        self.tracing = (
            Tracing.otlp(
                settings.otlp_endpoint,
                {"metalserve.model": settings.model, "metalserve.port": str(settings.port)},
            )
            if settings.otlp_endpoint
            else None
        )
        # Where the time to ready went (seconds by phase), once ready.
        self.startup: dict[str, float] = {}

    # --- state ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY and not self.draining and self.engine.is_alive()

    def state(self) -> str:
        if self.draining:
            return "draining"
        if not self.engine.is_alive():
            return "engine-dead"
        return self.phase.value

    def enter(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        self._idle_event().clear()

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0:
            self._idle_event().set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no inference request is in flight; False on timeout."""
        if self.in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle_event().wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if self.in_flight == 0:
                self._idle.set()
        return self._idle

    # --- loading --------------------------------------------------------------------------

    async def load_initial(self) -> None:
        timings = {"process_start": process_seconds()}
        try:
            bundle = await self.host.start(self.version_id, timings, loaded=_begin_tokenizer)
            started = time.monotonic()
            await _tokenizer_for_requests(bundle)
            timings["tokenizer"] = time.monotonic() - started
        except store.VerificationError as exc:
            self.fatal(ExitCode.VERIFICATION_FAILED, str(exc))
        except store.VersionNotFoundError as exc:
            self.fatal(ExitCode.VERSION_NOT_FOUND, str(exc))
        except (LoadError, store.StoreError) as exc:
            self.fatal(ExitCode.LOAD_FAILED, str(exc))
        except Exception as exc:
            log.exception("loading failed")
            self.fatal(ExitCode.LOAD_FAILED, f"loading failed: {exc!r}")
        else:
            timings["ready"] = process_seconds()
            self.startup = timings
            self.metrics.set_startup(self.startup)
            self.metrics.set_model(bundle.name, bundle.version_id)
            self.phase = Phase.READY
            log.info(
                "ready: %s version %s (%s)",
                bundle.name,
                bundle.version_id,
                ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in self.startup.items()),
            )

    def _followed(self, view: ModelView) -> None:
        """Another API process's: the engine's process prepares sequences for ``view``'s
        version from now on (its tokenizer built by then): ready, at the start. On the engine
        socket's reader thread, before this process tells the engine it switched (the first
        API process is ready, or swapped, only after that)."""
        self.version_id = view.version_id
        self.metrics.set_model(view.name, view.version_id)
        if self.phase is not Phase.READY:
            self.startup = {"process_start": self._created, "ready": process_seconds()}
            self.phase = Phase.READY
            log.info("ready: %s version %s", view.name, view.version_id)

    def stop_ranks(self) -> None:
        """After the engine stopped (which ends the other ranks' steps): wait for them."""
        self.host.stop_ranks()

    def fatal(self, code: ExitCode, message: str) -> None:
        log.error("cannot serve: %s", message)
        self.phase = Phase.FAILED
        self.failure = message
        self.exit_code = code
        self.on_fatal()

    # --- request admission ----------------------------------------------------------------

    def admit(self, model: str) -> ModelView:
        if self.draining:
            raise ApiError(503, "the server is draining; retry on another replica", code="draining")
        bundle = self.engine.target_model
        if self.phase is not Phase.READY or bundle is None:
            raise ApiError(503, f"the model is not ready ({self.state()})", code="not_ready")
        if not self.engine.is_alive():
            raise ApiError(503, "the generation engine stopped", code="engine_dead")
        if model != bundle.name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this replica serves {bundle.name!r}",
                param="model",
                code="model_not_found",
            )
        return bundle

    # --- hot reload -----------------------------------------------------------------------

    async def reload(self, ref: str) -> dict[str, Any]:
        """Load, verify and warm up version ``ref``, then swap it in while serving; one at a
        time, only while ready. Returns the answer of ``POST /admin/reload``."""
        if self.draining:
            raise ApiError(503, "the server is draining", code="draining")
        if self.phase is not Phase.READY:
            raise ApiError(409, f"cannot reload while {self.state()}", code="not_ready")
        if self.reload_lock.locked():
            raise ApiError(409, "another reload is in progress", code="reload_in_progress")
        async with self.reload_lock:
            return await self._reload(ref)

    async def _reload(self, ref: str) -> dict[str, Any]:
        settings = self.settings
        try:
            version_id = store.resolve_version(settings.store, settings.model, ref)
        except store.AmbiguousVersionError as exc:
            raise ApiError(400, str(exc), param="version", code="ambiguous_version") from exc
        except store.StoreError as exc:
            self.metrics.reloads.labels(result="not_found").inc()
            raise ApiError(404, str(exc), param="version", code="version_not_found") from exc
        current = self.engine.model
        assert current is not None
        if version_id == current.version_id:
            return {"model": current.name, "version_id": version_id, "changed": False}
        started = time.monotonic()
        try:
            bundle = await self.host.load_next(version_id, loaded=_begin_tokenizer)
            await _tokenizer_for_requests(bundle)
        except store.VerificationError as exc:
            self.metrics.reloads.labels(result="verification_failed").inc()
            raise ApiError(409, str(exc), param="version", code="verification_failed") from exc
        except (LoadError, store.StoreError, ValueError, OSError) as exc:
            self.metrics.reloads.labels(result="load_failed").inc()
            raise ApiError(
                422, f"cannot load {version_id[:12]}: {exc}", code="load_failed"
            ) from exc
        # The served version is the old one until the switch; a switch that fails stops the
        # engine (a 500 here, /healthz 503), never a 4xx that says the old one still serves.
        previous = await self.host.swap_in(bundle)
        self.version_id = bundle.version_id
        self.metrics.set_model(bundle.name, bundle.version_id)
        self.metrics.reloads.labels(result="ok").inc()
        log.info("reloaded %s -> %s", (previous or "")[:12], bundle.short_id)
        return {
            "model": bundle.name,
            "version_id": bundle.version_id,
            "previous_version_id": previous,
            "changed": True,
            "seconds": round(time.monotonic() - started, 3),
        }


def _begin_tokenizer(bundle: ModelView) -> None:
    """Once a version is loaded: the API side's tokenizer of it built beside its warm-up
    (without transformers where its files allow, ``metalserve.tokenization``; an engine's
    process sends the files alone). A failure here is met again, and reported, by
    ``_tokenizer_for_requests``."""

    def build() -> None:
        with contextlib.suppress(Exception):
            bundle.tokenizer.prepare()

    threading.Thread(target=build, name="metalserve-tokenizer", daemon=True).start()


async def _tokenizer_for_requests(bundle: ModelView) -> None:
    """Before a version serves: the API side's tokenizer built (the first request would
    otherwise wait for it), or the build's error raised."""
    await in_daemon_thread("metalserve-tokenizer", bundle.tokenizer.prepare)


def process_seconds() -> float:
    """Seconds since this process started (Linux's /proc/self/stat; the start is in clock ticks
    since boot): the time to ready counts the interpreter's start and the imports too."""
    stat = Path("/proc/self/stat").read_text()
    started_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
