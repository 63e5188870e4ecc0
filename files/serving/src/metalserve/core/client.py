"""The API process's side of the engine's process: ``CoreClient`` stands where
``metalserve.host.ModelHost`` does, its ``RemoteEngine`` where ``metalserve.engine.Engine`` does.

Sequences stay API objects (``Sequence`` with a ``ModelView``): the reader thread hands their
events to their sinks (the replica's relay, one hand-off to the event loop per message) and sets
their phase times once they end. A hot reload is two calls: ``load`` (the next version beside the
served one; its view comes back), then ``swap``. From the moment the swap is sent, sequences are
prepared for the next version only (one socket keeps the order: the engine's process sees every
sequence prepared for the old version before the swap); one prepared for the old version after
that is refused here as stale, and ``start_generation`` prepares it again.

Another API process of the replica (``serve --api-processes``, ``metalserve.api.worker``) has
a ``RemoteEngine`` that follows: it submits and cancels its own sequences over a socket of its
own and makes no calls; the engine's process tells it of each version loaded (its tokenizer is
built then) and of the version sequences are prepared for from then on (``Live``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from metalserve.core.messages import (
    OBSERVED,
    Beat,
    Call,
    Cancel,
    EngineFacts,
    Hello,
    Live,
    Loaded,
    Reply,
    Step,
    Submit,
    Switched,
)
from metalserve.core.spawn import EngineProcess, spawn_engine_process
from metalserve.engine import (
    IDLE_WAIT_SECONDS,
    Failed,
    QueueFullError,
    Sequence,
    StaleModelError,
    TextDelta,
)
from metalserve.host import OnLoaded, freeze_heap
from metalserve.loader import ModelView
from metalserve.metrics import Metrics
from metalserve.relay import EventRelay
from metalserve.settings import ServeSettings

log = logging.getLogger("metalserve.core")

# How long ``stop`` waits for the engine's process to end before it kills it.
STOP_SECONDS = 10.0


@dataclass(frozen=True)
class RemoteProfile:
    """A profile recorded in the engine's process: the future has its summary."""

    future: Future[dict[str, Any]]


class RemoteEngine:
    """The engine of the engine's process, as the API uses an ``Engine``."""

    def __init__(
        self,
        settings: ServeSettings,
        observer: Metrics,
        relay: EventRelay,
        *,
        reload_headroom: bool,
        spawned: EngineProcess | None = None,
        follow: Connection | None = None,
    ) -> None:
        self.settings = settings
        self._spawned = spawned
        # Another API process's: its socket to the engine's process, which the first started.
        self.follower = follow is not None
        self.max_batch_size = settings.batch_limit
        self.max_queue = settings.max_queue
        self.quantization = settings.quantization
        self.idle_wait = IDLE_WAIT_SECONDS  # the engine's own, sent at start
        self._reload_headroom = reload_headroom
        self._observer = observer
        self._relay = relay
        # Sequences in the engine's process by id, and the id of each.
        self._seqs: dict[int, Sequence] = {}
        self._ids: dict[Sequence, int] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._next_id = itertools.count(1)
        # Submissions and a swap's announcement are ordered under this lock.
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._current: ModelView | None = None
        self._pending: ModelView | None = None
        # Until a model goes live: none built yet, the batch limit asked for.
        self.facts = EngineFacts(None, False, [], 0, None, settings.batch_limit)
        self._beat = time.monotonic()
        self._gone = False
        self._stopping = False
        # Whether the engine's process said anything yet (it beats once it read its first
        # message, which it reads after torch's import).
        self._heard = False
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = follow
        self._reader: threading.Thread | None = None
        self._profile: RemoteProfile | None = None
        # The versions the engine's process told of once loaded (``Loaded``), until their
        # start or load call answers; and who is told of them.
        self._loaded: dict[str, ModelView] = {}
        self._on_loaded: OnLoaded | None = None
        # A follower's: told once sequences are prepared for a version (on the reader thread).
        self.on_live: Callable[[ModelView], None] = lambda view: None

    # --- the process -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine's process, or take over the one ``serve`` started already (it
        imports and builds the engine while this one goes on: calls sent meanwhile wait in the
        socket); a follower only listens to it."""
        if self.follower:
            self._start_reader()
            return
        spawned, self._spawned = self._spawned or spawn_engine_process(), None
        self._process, self._conn = spawned.process, spawned.conn
        self._beat = time.monotonic()  # its first beat comes once it has imported
        self._send(Hello(self.settings, self.idle_wait, self._reload_headroom))
        self._start_reader()
        log.info("engine process %d started", self._process.pid)

    def _start_reader(self) -> None:
        self._reader = threading.Thread(target=self._read, name="metalserve-core-client")
        self._reader.daemon = True
        self._reader.start()
        # This process builds the versions' tokenizers from the files their views bring: what
        # that takes is imported meanwhile, not when the first view arrives.
        threading.Thread(
            target=_import_view_libraries, name="metalserve-imports", daemon=True
        ).start()

    def is_alive(self) -> bool:
        if self.follower:
            return self._reader is not None and not self._gone
        return self._process is not None and not self._gone and self._process.poll() is None

    def dump_stacks(self) -> None:
        """Every thread's stack of the engine's process to its stderr (the journal): where a
        stalled loop is stuck (SIGUSR1: faulthandler there writes them, whatever its threads
        do)."""
        if self.is_alive():
            assert self._process is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._process.pid, signal.SIGUSR1)

    def heartbeat_age(self) -> float:
        """Seconds since the engine loop's last sign of progress, as its process last said;
        infinite once the process is gone (or before it started)."""
        if not self.is_alive():
            return float("inf")
        return time.monotonic() - self._beat

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        if self.follower:
            # The engine's process cancels what is left of this one's sequences at the EOF;
            # the first API process stops it.
            self._stopping = True
            if self._conn is not None:
                self._conn.close()
            return
        process = self._process
        if process is None:
            return
        self._stopping = True
        if self.is_alive() and not self._heard:
            # Still importing (1-4 s on a loaded host): it holds nothing to drain or release,
            # and would read the stop only after its imports.
            process.kill()
        elif self.is_alive():
            stopping = self.call("stop")
            try:
                stopping.result(timeout)
            except Exception as exc:  # noqa: BLE001 - it ends below either way
                log.warning("the engine's process did not stop cleanly: %s", exc)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("the engine's process did not end within %.0fs: killed", timeout)
            process.kill()
            process.wait()
        if self._reader is not None:
            self._reader.join(timeout)  # it reads EOF now: then the socket can close
        if self._conn is not None:
            self._conn.close()

    # --- what the API asks of an engine ----------------------------------------------------

    @property
    def model(self) -> ModelView | None:
        return self._current

    @property
    def target_model(self) -> ModelView | None:
        return self._pending or self._current

    # The engine's properties that ``/version`` reads, as the engine's process last told them.

    @property
    def decode_path(self) -> str | None:
        return self.facts.decode_path

    @property
    def decode_compiled(self) -> bool:
        return self.facts.decode_compiled

    @property
    def decode_gemm_tuning(self) -> list[dict[str, Any]]:
        return self.facts.decode_gemm_tuning

    @property
    def prefix_cache_tokens_held(self) -> int:
        return self.facts.prefix_cache_tokens_held

    @property
    def weight_bytes(self) -> int | None:
        return self.facts.weight_bytes

    @property
    def batch_slots(self) -> int:
        return self.facts.batch_slots

    @property
    def modeling(self) -> str | None:
        return self.facts.modeling

    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if not self.is_alive():
                raise RuntimeError("the engine is not running")
            if seq.bundle is not self.target_model:
                raise StaleModelError(seq.bundle.short_id)
            # Those beyond the batch's slots wait: as the engine counts its queue.
            waiting = len(self._seqs) - self.batch_slots
            if waiting >= self.max_queue:
                raise QueueFullError(f"{waiting} requests are already waiting")
            rid = next(self._next_id)
            self._seqs[rid] = seq
            self._ids[seq] = rid
            submission = Submit(
                rid, seq.bundle.version_id, seq.prompt_ids, seq.params, seq.endpoint, seq.created_at
            )
            try:
                self._send(submission)
            except BaseException:
                del self._seqs[rid], self._ids[seq]  # never sent: no place in the queue
                raise

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        rid = self._ids.get(seq)
        if rid is not None and rid in self._seqs and self.is_alive():
            with contextlib.suppress(RuntimeError):  # gone meanwhile: nothing runs it
                self._send(Cancel(rid))

    def abort_all(self, message: str) -> None:
        if self.follower:  # its own sequences only: the first API process aborts the rest
            for seq in list(self._seqs.values()):
                self.cancel(seq)
            return
        self.call("abort_all", message)

    def wedge(self, seconds: float) -> Future[None]:
        if seconds <= 0:
            raise ValueError("seconds must be > 0")
        return self.call("wedge", seconds)

    def profile(
        self, passes: int, max_seconds: float, directory: Path, *, python: bool = False
    ) -> RemoteProfile:
        # Refused here as the engine refuses (the admin API's 409 profile_refused).
        if not self.is_alive():
            raise RuntimeError("the engine is not running")
        if self._profile is not None and not self._profile.future.done():
            raise RuntimeError("a profile is already being recorded")
        self._profile = RemoteProfile(self.call("profile", passes, max_seconds, directory, python))
        return self._profile

    # --- loads and swaps (``CoreClient``) --------------------------------------------------

    def call(self, name: str, *args: Any) -> Future[Any]:
        """Ask the engine's process for ``name`` (``messages.CALLS``); its answer in the future."""
        future: Future[Any] = Future()
        if self.follower:
            future.set_exception(RuntimeError("calls are the first API process's"))
            return future
        if not self.is_alive():
            future.set_exception(RuntimeError("the engine's process is not running"))
            return future
        cid = next(self._next_id)
        self._calls[cid] = future
        try:
            self._send(Call(cid, name, args))
        except RuntimeError as exc:  # gone meanwhile: the caller learns it from the future
            if self._calls.pop(cid, None) is not None:
                future.set_exception(exc)
        return future

    def expect_load(self, on_loaded: OnLoaded | None) -> None:
        """Before a start or load call: who is told of its version once loaded (on the reader
        thread); what an earlier, failed one told of is dropped."""
        self._loaded.clear()
        self._on_loaded = on_loaded

    def _told_loaded(self, view: ModelView) -> None:
        self._loaded[view.version_id] = view
        if self._on_loaded is not None:
            self._on_loaded(view)

    def loaded_view(self, view: ModelView) -> ModelView:
        """The view the engine's process sent of ``view``'s version once loaded (the same
        version, and what was begun with it, such as its tokenizer), else ``view``."""
        return self._loaded.pop(view.version_id, view)

    def went_live(self, view: ModelView, facts: EngineFacts) -> None:
        """The engine's process serves ``view``'s version now."""
        with self._lock:
            self._current, self._pending, self.facts = view, None, facts

    async def swap(self, view: ModelView) -> str | None:
        """Serve ``view``'s version (loaded there already); the replaced version's id."""
        with self._lock:
            self._pending = view
            swapping = self.call("swap", view.version_id)
        # Settled when the answer comes, even if this caller stopped waiting: the engine's
        # process serves the next version from then on whatever the caller does.
        swapping.add_done_callback(lambda done: self._swapped(view, done))
        previous, _ = await asyncio.shield(asyncio.wrap_future(swapping))
        previous_id: str | None = previous
        return previous_id

    def _swapped(self, view: ModelView, done: Future[Any]) -> None:
        if done.cancelled() or done.exception() is not None:
            with self._lock:
                self._pending = None
            return
        _, facts = done.result()
        self.went_live(view, facts)

    # --- the socket ------------------------------------------------------------------------

    def _send(self, message: object) -> None:
        assert self._conn is not None
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError as exc:
            raise RuntimeError(f"the engine's process is gone: {exc}") from exc

    def _read(self) -> None:
        assert self._conn is not None
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # unreadable: nothing after it can be trusted either
                log.exception("a message from the engine's process could not be read")
                if self._process is not None:
                    self._process.kill()
                break
            self._heard = True
            try:
                if isinstance(message, Step):
                    self._deliver(message)
                elif isinstance(message, Beat):
                    self._beat = message.at
                elif isinstance(message, Loaded):
                    self._told_loaded(message.view)
                elif isinstance(message, Reply):
                    self._answer(message)
                elif isinstance(message, Live):
                    self._live(message.view)
            except Exception:  # one message's trouble (a sink, an observer), not the socket's
                log.exception("a message from the engine's process could not be handled")
        self._gone = True
        code: int | None = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = None if self._process is None else self._process.wait(STOP_SECONDS)
        if self._stopping:
            log.info("the engine's process ended (exit code %s)", code)
        else:
            log.critical("the engine's process ended (exit code %s)", code)
        self._fail_everything()

    def _deliver(self, step: Step) -> None:
        seqs = self._seqs
        for rid, event in step.events:
            seq = seqs.get(rid)
            if seq is not None:
                seq.sink(TextDelta(event) if isinstance(event, str) else event)
        for rid, ended in step.ended:
            seq = seqs.pop(rid, None)
            if seq is not None:
                self._ids.pop(seq, None)
                seq.admitted_at = ended.admitted_at
                seq.first_token_at = ended.first_token_at
                seq.finished_at = ended.finished_at
                seq.generated = ended.generated
                seq.done = True
        for name, args in step.observed:
            if name in OBSERVED:
                getattr(self._observer, name)(*args)
        self._relay.flush()

    def _live(self, view: ModelView) -> None:
        """A follower's: sequences are prepared for ``view``'s version from now on, with the
        tokenizer begun when it was loaded (built here if not yet: then it is before any
        sequence of it is)."""
        view = self.loaded_view(view)
        view.tokenizer.prepare()
        self.went_live(view, self.facts)
        self.on_live(view)
        # After every sequence prepared for the old version (submitted under the same lock),
        # and once this process takes requests for the new one.
        self._send(Switched(view.version_id))

    def _answer(self, reply: Reply) -> None:
        future = self._calls.pop(reply.cid, None)
        if future is None or not future.set_running_or_notify_cancel():
            return
        if reply.error is not None:
            future.set_exception(reply.error)
        else:
            future.set_result(reply.value)

    def _fail_everything(self) -> None:
        with self._lock:
            seqs, self._seqs = self._seqs, {}
            self._ids.clear()
            calls, self._calls = self._calls, {}
        for seq in seqs.values():
            seq.done = True
            seq.sink(Failed(503, "the generation engine stopped"))
            self._observer.sequence_finished("error", len(seq.prompt_ids), len(seq.generated))
        self._observer.engine_state(0, 0, 0.0)
        self._relay.flush()
        for future in calls.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the engine's process ended"))


def _import_view_libraries() -> None:
    # A view names its device and dtype (no torch), and a generic tokenizer (the Llama family's)
    # needs the tokenizers library and the chat templates' Jinja alone (``tokenization.
    # own_form``): this process imports neither torch nor transformers (2-3 s of interpreter
    # time on an H100 host beside the engine's load, with torch's memory). One that needs
    # transformers imports it when its files arrive, beside the engine's warm-up.
    import tokenizers  # noqa: F401

    from metalserve import chat_template  # noqa: F401

    # Most of what this process holds while serving is here now: frozen out of collections
    # while the engine's process still loads, the freeze at ready (``server``) collects only
    # what came since, and no longer holds the event loop as the first requests arrive (8B on
    # an H100: 0.12-0.14 s, right after ready; BENCHMARKS round 2 step 30). Without a
    # collection of its own: at 850M these imports end about when the engine answers, and the
    # collection (0.11-0.14 s, the interpreter held) delayed the tokenizer that ready awaits
    # (step 34); the imports' garbage is a few thousand objects.
    freeze_heap(collect=False)


class CoreClient:
    """The model side of a replica whose engine runs in a process of its own: what
    ``ModelHost`` does, asked of that process."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: Metrics,
        relay: EventRelay,
        *,
        reload_headroom: bool,
        spawned: EngineProcess | None = None,
        follow: Connection | None = None,
    ) -> None:
        self.engine = RemoteEngine(
            settings,
            metrics,
            relay,
            reload_headroom=reload_headroom,
            spawned=spawned,
            follow=follow,
        )
        self.rank_infos: list[dict[str, Any]] = []  # one rank: none to tell of

    async def start(
        self, version_id: str, timings: dict[str, float], loaded: OnLoaded | None = None
    ) -> ModelView:
        self.engine.expect_load(loaded)
        asked = self.engine.call("start", version_id, time.monotonic())
        view, parts, facts = await asyncio.wrap_future(asked)
        view = self.engine.loaded_view(view)
        timings.update(parts)
        self.engine.went_live(view, facts)
        return view

    async def load_next(self, version_id: str, loaded: OnLoaded | None = None) -> ModelView:
        """A hot reload's first half, there; the next version's view."""
        self.engine.expect_load(loaded)
        view: ModelView = await asyncio.wrap_future(self.engine.call("load", version_id))
        return self.engine.loaded_view(view)

    async def swap_in(self, view: ModelView) -> str | None:
        """A hot reload's second half, there; the replaced version's id."""
        return await self.engine.swap(view)

    def stop_ranks(self) -> None:
        """One rank: nothing to wait for."""
