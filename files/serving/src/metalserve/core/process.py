"""The engine's process of a replica: ``python -m metalserve.core.process FD``, started by the
API process (``client.RemoteEngine.start``) with its end of a socket pair as ``FD``.

It loads the versions and runs the engine (``metalserve.host.ModelHost``): sequences and calls
come in on a reader thread; the engine thread's events and observations leave once per engine
iteration (``Outbox``, flushed as the in-process engine's relay is); a beat thread sends the
engine loop's heartbeat. The process ends when the API asks (``stop``), when the engine stops
(the API then sees it gone: ``/healthz`` answers 503) and at once when the API's end closes (the
API process is gone: nobody is left to answer).

With ``serve --api-processes N`` it has N API processes (``Client``): the first, whose socket
came first, makes the calls and is told what the observer saw; each other one only submits and
cancels its own sequences and hears of their events, of each version loaded (``Loaded``: it
builds its tokenizer) and of each version that sequences are prepared for from then on
(``Live``). Those are sent from a thread of their own, so that an API process still starting
or busy never holds the engine up.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, NoReturn

from metalserve import triton_warmup
from metalserve.core.messages import (
    CALLS,
    Beat,
    Call,
    Cancel,
    Ended,
    EngineFacts,
    Hello,
    Live,
    Loaded,
    Reply,
    Step,
    Submit,
    Switched,
)
from metalserve.engine import (
    Event,
    Failed,
    QueueFullError,
    Sequence,
    StaleModelError,
    TextDelta,
)
from metalserve.host import ModelHost, freeze_heap
from metalserve.loader import LoadedModel, ModelView, import_libraries
from metalserve.logs import configure_logging
from metalserve.metrics import GcTimer

log = logging.getLogger("metalserve.core")

# How often the engine loop's heartbeat (and what loads observed meanwhile) goes to the API.
BEAT_SECONDS = 0.2
# How long a swap waits for the other API processes to prepare for the next version (one that
# has not by then gets a 503 "retry" for each sequence it prepared for the old one), and the
# start for them to be ready (their imports and tokenizer may take longer than the load).
SWITCH_SECONDS = 5.0
START_SWITCH_SECONDS = 60.0
UNBOUNDED_QUEUE = 2**62


class Outbox:
    """What the engine's process has to tell the API, gathered until the next flush: events by
    sequence, the sequences that ended, and observer calls (it is the host's observer)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[int, str | Event]] = []
        self._ended: list[tuple[int, Ended]] = []
        self._observed: list[tuple[str, tuple[Any, ...]]] = []
        # Collections, recorded from gc's callback: that may run inside any allocation, this
        # object's locked sections included, so it takes no lock (a deque's append is atomic).
        self._gc_pauses: deque[tuple[int, float]] = deque()

    def text(self, rid: int, text: str) -> None:
        with self._lock:
            self._events.append((rid, text))

    def last(self, rid: int, event: Event, ended: Ended) -> None:
        """A sequence's last event and its end, together: one Step carries both."""
        with self._lock:
            self._events.append((rid, event))
            self._ended.append((rid, ended))

    def take(self) -> Step | None:
        with self._lock:
            while self._gc_pauses:
                self._observed.append(("gc_pause", self._gc_pauses.popleft()))
            if not (self._events or self._ended or self._observed):
                return None
            step = Step(self._events, self._ended, self._observed)
            self._events, self._ended, self._observed = [], [], []
            return step

    def _observe(self, name: str, *args: Any) -> None:
        with self._lock:
            self._observed.append((name, args))

    # HostObserver: recorded, counted by the API's metrics.

    def forward_pass(
        self, phase: str, batch_size: int, seconds: float, parts: dict[str, float]
    ) -> None:
        self._observe("forward_pass", phase, batch_size, seconds, parts)

    def engine_state(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        self._observe("engine_state", running, waiting, kv_cache_usage)

    def request_queued(self, seconds: float) -> None:
        self._observe("request_queued", seconds)

    def deferred_graphs(self, count: int) -> None:
        self._observe("deferred_graphs", count)

    def prefix_cache(self, prompt_tokens: int, reused_tokens: int) -> None:
        self._observe("prefix_cache", prompt_tokens, reused_tokens)

    def first_token(self, endpoint: str, seconds: float) -> None:
        self._observe("first_token", endpoint, seconds)

    def sequence_finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._observe("sequence_finished", reason, prompt_tokens, completion_tokens)

    def cache_load(self, result: str) -> None:
        self._observe("cache_load", result)

    def gc_pause(self, generation: int, seconds: float) -> None:
        self._gc_pauses.append((generation, seconds))


class Client:
    """One API process: its socket, what it is to be told (events of its own sequences), and
    those sequences by its ids. The first one's messages are sent by the sending thread, under
    a lock; another one's by a thread of its own (``serve``), in order."""

    def __init__(self, index: int, conn: Connection) -> None:
        self.index = index
        self.conn = conn
        self.lock = threading.Lock()
        self.outbox = Outbox()
        self.seqs: dict[int, Sequence] = {}
        self.gone = False
        self.switched_to: str | None = None  # the version its last ``Switched`` named
        self._queue: queue.SimpleQueue[bytes | memoryview | None] = queue.SimpleQueue()

    @property
    def first(self) -> bool:
        return self.index == 0

    def post(self, data: bytes | memoryview) -> None:
        """Another API process's: ``data`` sent by its thread (``serve``), never blocking."""
        if not self.gone:
            self._queue.put(data)

    def serve(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except OSError:
                self.lost()
                return

    def lost(self) -> None:
        """Its end closed (that API process is gone): its sequences are cancelled (nobody
        reads their tokens; the first API process ends the replica)."""
        if self.gone:
            return
        self.gone = True
        self._queue.put(None)
        # At the replica's stop it has none left; else its clients lose their answers.
        level = logging.ERROR if self.seqs else logging.INFO
        log.log(level, "API process %d is gone: %d sequences cancelled", self.index, len(self.seqs))
        for seq in list(self.seqs.values()):
            seq.cancel()


class Core:
    """The engine's process: its host, the sequences it runs, and its ends of the sockets."""

    def __init__(self, conns: list[Connection], hello: Hello, imported_at: float = 0.0) -> None:
        self.clients = [Client(index, conn) for index, conn in enumerate(conns)]
        self.api = self.clients[0]  # the first API process: calls and observations
        self.conn = self.api.conn
        self.imported_at = imported_at  # time.monotonic() once torch was imported
        self._send_lock = self.api.lock
        self.outbox = self.api.outbox
        # The API process refuses what its queue cannot take (429 before a stream starts);
        # here a sequence waits until the loop's next admission, however many came at once.
        settings = hello.settings.model_copy(update={"max_queue": UNBOUNDED_QUEUE})
        self.host = ModelHost(
            settings,
            self.outbox,
            flush_events=self.flush,
            reload_headroom=hello.reload_headroom,
            on_rank_failure=lambda why: log.critical("a rank failed: %s", why),
        )
        self.engine = self.host.engine
        self.engine.idle_wait = hello.idle_wait
        # This process's collections stop its engine thread: counted with the API's.
        self._gc_timer = GcTimer(self.outbox.gc_pause)
        self._gc_timer.watch()
        # The versions sequences may be prepared for: the served one, and one loaded next.
        self.models: dict[str, LoadedModel] = {}
        self.seqs = self.api.seqs
        # Notified as the other API processes say ``Switched`` (or are gone). While they are
        # asked to (``_switch_others``), the version they switch to, and the sequences they
        # prepared for it already: the engine takes them once it swapped.
        self._switched = threading.Condition()
        self._switching: str | None = None
        self._held: list[tuple[Submit, Client]] = []
        self._stopped: asyncio.Event | None = None
        self._stopping = False
        self._calls: set[asyncio.Future[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- to the API ------------------------------------------------------------------------

    def send(self, message: object) -> None:
        """Pickled before the lock (a version's view holds its tokenizer: megabytes), sent
        under it."""
        data = ForkingPickler.dumps(message)
        try:
            with self._send_lock:
                self.conn.send_bytes(data)
        except OSError:
            _exit_orphaned()

    def tell_others(self, message: object) -> None:
        """``message`` to every API process but the first (none without ``--api-processes``)."""
        if len(self.clients) > 1:
            data = ForkingPickler.dumps(message)
            for client in self.clients[1:]:
                client.post(data)

    def flush(self) -> None:
        """After every engine iteration (the engine's ``flush_events``), every beat and every
        refused sequence: what the outboxes hold is taken and sent (the first API process's)
        or queued (another's) under each one's lock, so Steps leave in the order their events
        happened, whichever thread flushes."""
        try:
            with self._send_lock:
                step = self.outbox.take()
                if step is not None:
                    self.conn.send(step)
        except OSError:
            _exit_orphaned()
        for client in self.clients[1:]:
            with client.lock:
                step = client.outbox.take()
                if step is not None:
                    client.post(ForkingPickler.dumps(step))

    def _beats(self) -> None:
        while self.engine.is_alive():
            beat = Beat(time.monotonic() - self.engine.heartbeat_age())
            self.send(beat)
            self.tell_others(beat)
            self.flush()
            time.sleep(BEAT_SECONDS)

    # --- from the API ----------------------------------------------------------------------

    def _read(self, client: Client) -> None:
        """A reader thread per API process: sequences and cancellations at once, the first
        one's calls on the event loop."""
        assert self._loop is not None
        while True:
            try:
                message = client.conn.recv()
            except (EOFError, OSError):
                if client.first:
                    _exit_orphaned()
                client.lost()
                with self._switched:
                    self._switched.notify_all()
                return
            if isinstance(message, Submit):
                self.submit(message, client)
            elif isinstance(message, Cancel):
                seq = client.seqs.get(message.rid)
                if seq is not None:
                    seq.cancel()
            elif isinstance(message, Switched) and not client.first:
                with self._switched:
                    client.switched_to = message.version_id
                    self._switched.notify_all()
            elif not client.first:
                log.error("unexpected message from API process %d: %r", client.index, message)
            elif isinstance(message, Call) and message.name == "swap":
                self._begin_swap(message)
            elif isinstance(message, Call) and message.name in CALLS:
                self._loop.call_soon_threadsafe(self._start_call, message)
            else:
                log.error("unexpected message from the API process: %r", message)

    def submit(self, message: Submit, client: Client | None = None) -> None:
        client = client or self.api
        if self._switching is not None:
            with self._switched:
                if message.version_id == self._switching:
                    self._held.append((message, client))
                    return
        bundle = self.models.get(message.version_id)
        if bundle is None:
            # The first API process prepares sequences only for a version held here; another
            # one's for the version a swap replaced only where it did not switch in time
            # (``SWITCH_SECONDS``): the client retries on another replica, or here.
            failed = Failed(503, "the model was replaced; retry")
            client.outbox.last(message.rid, failed, Ended(None, None, time.monotonic(), []))
            self.flush()
            return
        seq = Sequence(
            bundle=bundle,
            prompt_ids=message.prompt_ids,
            params=message.params,
            sink=lambda event: None,
            endpoint=message.endpoint,
            created_at=message.created_at,
        )
        seq.sink = self._sink(client, message.rid, seq)
        client.seqs[message.rid] = seq
        try:
            self.engine.submit(seq)
        except QueueFullError as exc:
            seq.fail(429, f"the server is overloaded: {exc}", None)
        except StaleModelError:
            seq.fail(503, "the model was replaced; retry", None)
        except Exception as exc:  # noqa: BLE001 - stopped: the client learns why
            seq.fail(503, str(exc), None)
        else:
            return
        self.flush()

    def _sink(self, client: Client, rid: int, seq: Sequence) -> Callable[[Event], None]:
        outbox = client.outbox

        def push(event: Event) -> None:
            if isinstance(event, TextDelta):
                outbox.text(rid, event.text)
                return
            # Finished or Failed: its last.
            client.seqs.pop(rid, None)
            ended = Ended(seq.admitted_at, seq.first_token_at, seq.finished_at, seq.generated)
            outbox.last(rid, event, ended)

        return push

    def _begin_swap(self, call: Call) -> None:
        """The reader thread, in order with the sequences around it: the engine takes the next
        version's sequences from the next message on (they may come before the event loop
        would get to the call)."""
        try:
            (version_id,) = call.args
            bundle = self.models[version_id]
            self._switch_others(bundle, SWITCH_SECONDS)
            swapping = self.engine.swap(bundle)
        except Exception as exc:  # noqa: BLE001 - the caller's to handle
            self._submit_held()
            self.send(Reply(call.cid, error=_picklable(exc)))
            return
        self._submit_held()
        # Every sequence for the old version came before (the first API process's on this
        # socket, the others' before their ``Switched``): none looks it up again.
        self.models = {version_id: bundle}
        assert self._loop is not None
        self._loop.call_soon_threadsafe(
            self._answer_soon, call.cid, self._swapped(bundle, swapping)
        )

    def _switch_others(self, bundle: LoadedModel, timeout: float) -> None:
        """Before a swap: the other API processes prepare sequences for ``bundle``'s version
        from now on, and each one's sequences for the old one reach the engine first."""
        if len(self.clients) == 1:
            return
        version_id = bundle.version_id
        with self._switched:
            self._switching = version_id
        self.tell_others(Live(bundle.view()))
        with self._switched:
            switched = self._switched.wait_for(
                lambda: all(c.gone or c.switched_to == version_id for c in self.clients[1:]),
                timeout,
            )
        if not switched:
            log.warning(
                "API processes %s did not switch to %s within %.0fs",
                [c.index for c in self.clients[1:] if c.switched_to != version_id],
                version_id[:12],
                timeout,
            )

    def _submit_held(self) -> None:
        """After the swap (or its failure): the sequences the others prepared for the next
        version meanwhile, to the engine."""
        with self._switched:
            held, self._held, self._switching = self._held, [], None
        for message, client in held:
            self.submit(message, client)

    async def _swapped(
        self, bundle: LoadedModel, swapping: Future[LoadedModel | None]
    ) -> tuple[str | None, EngineFacts]:
        previous = await self.host.settle_swap(bundle, swapping)
        return previous, self.facts()

    def _start_call(self, call: Call) -> None:
        try:
            answer = getattr(self, f"call_{call.name}")(*call.args)
        except Exception as exc:  # noqa: BLE001 - wrong arguments: the caller's to handle
            self.send(Reply(call.cid, error=_picklable(exc)))
            return
        self._answer_soon(call.cid, answer)

    def _answer_soon(self, cid: int, answer: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(self._answer(cid, answer))
        self._calls.add(task)  # kept until done: the loop holds tasks weakly
        task.add_done_callback(self._calls.discard)

    async def _answer(self, cid: int, answer: Coroutine[Any, Any, Any]) -> None:
        try:
            value = await answer
        except BaseException as exc:  # the caller's to handle
            # Its traceback is this process's: here, not in the API's log.
            log.warning("a call from the API failed", exc_info=True)
            self.send(Reply(cid, error=_picklable(exc)))
            return
        try:
            self.send(Reply(cid, value))
        except Exception as exc:  # unpicklable: the caller must still hear of it
            log.exception("the answer to a call could not be sent")
            self.send(Reply(cid, error=RuntimeError(f"the answer could not be sent: {exc!r}")))

    # --- calls -----------------------------------------------------------------------------

    async def call_start(
        self, version_id: str, asked_at: float
    ) -> tuple[ModelView, dict[str, float], EngineFacts]:
        # The API asked at ``asked_at`` (CLOCK_MONOTONIC: one clock for both processes); what
        # it waited for this process's imports (begun at its start) counts as imports.
        timings = {"imports": max(0.0, self.imported_at - asked_at)}
        bundle = await self.host.start(version_id, timings, loaded=self._loaded)
        self.models = {version_id: bundle}
        if len(self.clients) > 1:
            # Ready means every API process can serve it: the first one's answer waits for them.
            await asyncio.to_thread(self._switch_others, bundle, START_SWITCH_SECONDS)
            self._submit_held()
        # The heap frozen as the API process's is once ready, but after this answer (``_answer``
        # sends it in this task's step; the callback runs in the loop's next): its full
        # collection (0.10-0.12 s at 8B) is then no part of the time to ready, and is over long
        # before HAProxy sends requests (two passing checks, 2 s apart, by the role's defaults).
        asyncio.get_running_loop().call_soon(freeze_heap)
        return bundle.view(), timings, self.facts()

    async def call_load(self, version_id: str) -> ModelView:
        bundle = await self.host.load_next(version_id, loaded=self._loaded)
        self.models[version_id] = bundle
        return bundle.view()

    def _loaded(self, bundle: ModelView) -> None:
        """On the load's thread, before the warm-up: the API's tokenizers are built beside it."""
        assert isinstance(bundle, LoadedModel), "a version this process loaded"
        loaded = Loaded(bundle.view())
        self.send(loaded)
        self.tell_others(loaded)

    async def call_abort_all(self, message: str) -> None:
        self.engine.abort_all(message)

    async def call_wedge(self, seconds: float) -> None:
        await asyncio.wrap_future(self.engine.wedge(seconds))

    async def call_profile(
        self, passes: int, max_seconds: float, directory: Path, python: bool
    ) -> dict[str, Any]:
        profile = self.engine.profile(passes, max_seconds, directory, python=python)
        summary: dict[str, Any] = await asyncio.wrap_future(profile.future)
        return summary

    async def call_stop(self) -> None:
        # From here the engine's end is this call's: ``run`` waits for it to answer.
        self._stopping = True
        await asyncio.to_thread(self.engine.stop)
        await asyncio.to_thread(self.host.stop_ranks)
        assert self._stopped is not None
        self._stopped.set()

    def facts(self) -> EngineFacts:
        engine = self.engine
        return EngineFacts(
            decode_path=engine.decode_path,
            decode_compiled=engine.decode_compiled,
            decode_gemm_tuning=engine.decode_gemm_tuning,
            prefix_cache_tokens_held=engine.prefix_cache_tokens_held,
            weight_bytes=engine.weight_bytes,
            batch_slots=engine.batch_slots,
            modeling=engine.modeling,
        )

    # --- the process -----------------------------------------------------------------------

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.engine.start()
        for client in self.clients:
            name = f"metalserve-core-read-{client.index}"
            threading.Thread(target=self._read, args=(client,), name=name, daemon=True).start()
            if not client.first:
                name = f"metalserve-core-send-{client.index}"
                threading.Thread(target=client.serve, name=name, daemon=True).start()
        threading.Thread(target=self._beats, name="metalserve-core-beat", daemon=True).start()
        while (self._stopping or self.engine.is_alive()) and not self._stopped.is_set():
            try:
                await asyncio.wait_for(self._stopped.wait(), BEAT_SECONDS)
            except TimeoutError:
                continue
        self.flush()  # the stopped engine's last events
        if self._stopped.is_set():
            return 0
        log.critical("the generation engine stopped: this process ends")
        return 1


def _exit_orphaned() -> NoReturn:
    """The API process is gone (its end of the socket closed): nobody is left to answer. Every
    thread's stack first (a wedged engine's is why the API was killed)."""
    log.critical("the API process is gone: this process ends")
    faulthandler.dump_traceback(all_threads=True)
    os._exit(0)


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (the API re-raises it), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 - the bytes just made here
    except Exception:  # noqa: BLE001 - any reason: described instead
        return RuntimeError(repr(exc))
    return exc


def main() -> int:
    fds = [int(arg) for arg in sys.argv[1:]]
    for fd in fds:  # a process started from here must not keep an API's EOF away
        os.set_inheritable(fd, False)
    conns = [Connection(fd) for fd in fds]
    conn = conns[0]
    # A terminal's Ctrl-C, or a supervisor's SIGTERM to the whole group, must not end the
    # engine under the API's drain: the API process decides the end (``stop``, or its socket).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The API process asks for every thread's stack when the engine loop stalls (dump_stacks),
    # which it may do during the imports below (seconds on a loaded host): SIGUSR1's default
    # action would end this process then.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # Triton's set-up beside torch's import: mostly a hash that releases the interpreter lock.
    triton_warmup.begin()
    # torch now, while the API process still imports its own (``spawn``): the load needs it
    # first. Should it fail, the load's own import says why, through the start call.
    with contextlib.suppress(ImportError):
        import_libraries()
    imported_at = time.monotonic()
    try:
        hello: Hello = conn.recv()
    except EOFError:  # the API process ended before it asked anything: nothing to do
        return 0
    settings = hello.settings
    configure_logging(settings.log_level, settings.log_format)
    log.info(
        "engine process %d for API process %d%s",
        os.getpid(),
        os.getppid(),
        f" and {len(conns) - 1} more" if len(conns) > 1 else "",
    )
    return asyncio.run(Core(conns, hello, imported_at).run())


if __name__ == "__main__":
    sys.exit(main())
