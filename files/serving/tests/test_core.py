"""The engine's process (``python -m metalserve.core.process``) spoken to over its socket, as the
API process speaks to it: the order of a swap and the sequences around it, versions it does not
hold, cancellations, heartbeats, its end. The whole replica with it: ``test_engine_process``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from conftest import MODEL, Store, server_env
from metalserve.core.messages import (
    OBSERVED,
    Beat,
    Call,
    Cancel,
    Ended,
    Hello,
    Live,
    Loaded,
    Reply,
    Step,
    Submit,
    Switched,
)
from metalserve.core.process import Outbox
from metalserve.engine import Failed, Finished, TextDelta
from metalserve.engine.sequence import EngineObserver
from metalserve.loader import ModelView
from metalserve.sampling import SamplingParams
from metalserve.settings import ServeSettings

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
READ_SECONDS = 60.0


class Core:
    """An engine process and the API's end of its socket (and, with ``others``, the ends of
    that many other API processes' sockets, ``serve --api-processes``)."""

    def __init__(self, settings: ServeSettings, others: int = 0) -> None:
        pairs = [socket.socketpair() for _ in range(1 + others)]
        theirs = [pair[1] for pair in pairs]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metalserve.core.process", *(str(t.fileno()) for t in theirs)],
            pass_fds=tuple(t.fileno() for t in theirs),
            env=server_env(),
        )
        for end in theirs:
            end.close()
        self.conn = Connection(pairs[0][0].detach())
        self.others = [Connection(pair[0].detach()) for pair in pairs[1:]]
        self.conn.send(Hello(settings, idle_wait=0.2, reload_headroom=False))
        self.events: dict[int, list[Any]] = {}
        self.ended: dict[int, Ended] = {}
        self.beats: list[float] = []
        self.observed: list[str] = []
        self.loaded: list[ModelView] = []
        self._next = 0

    def call(self, name: str, *args: Any) -> int:
        self._next += 1
        self.conn.send(Call(self._next, name, args))
        return self._next

    def reply(self, cid: int) -> Any:
        """Read until the answer of call ``cid``; its value (its error raised)."""
        deadline = time.monotonic() + READ_SECONDS
        while time.monotonic() < deadline:
            message = self.read()
            if isinstance(message, Reply) and message.cid == cid:
                if message.error is not None:
                    raise message.error
                return message.value
        raise AssertionError(f"no answer to call {cid}")

    def read(self) -> Any:
        assert self.conn.poll(READ_SECONDS), "the engine's process said nothing"
        message = self.conn.recv()
        if isinstance(message, Step):
            for rid, event in message.events:  # a text delta comes as its text
                delta = TextDelta(event) if isinstance(event, str) else event
                self.events.setdefault(rid, []).append(delta)
            self.ended.update(message.ended)
            self.observed += [name for name, _ in message.observed]
        elif isinstance(message, Beat):
            self.beats.append(message.at)
        elif isinstance(message, Loaded):
            self.loaded.append(message.view)
        return message

    def until_ended(self, *rids: int) -> None:
        deadline = time.monotonic() + READ_SECONDS
        while not all(rid in self.ended for rid in rids):
            assert time.monotonic() < deadline, f"{rids} did not end"
            self.read()

    def submit(self, rid: int, view: ModelView, params: SamplingParams = GREEDY) -> None:
        prompt = view.encode("The quick brown fox", add_special_tokens=True)
        self.conn.send(Submit(rid, view.version_id, prompt, params, "test", time.monotonic()))

    def text(self, rid: int) -> str:
        return "".join(e.text for e in self.events.get(rid, []) if isinstance(e, TextDelta))


@pytest.fixture
def core(model_store: Store) -> Iterator[Core]:
    settings = ServeSettings(store=model_store.root, model=MODEL, version=model_store.v1)
    started = Core(settings)
    try:
        yield started
    finally:
        started.conn.close()  # the API's end gone: the process ends at once
        started.proc.wait(timeout=30)


def test_every_engine_observer_call_crosses_to_the_api_process() -> None:
    """The engine's process forwards each observer call (``Outbox``) and the API side replays
    only the names in ``OBSERVED``: a call missing from it would be dropped there silently."""
    calls = {name for name in vars(EngineObserver) if not name.startswith("_")}
    assert calls <= OBSERVED, sorted(calls - OBSERVED)
    assert all(callable(getattr(Outbox, name, None)) for name in calls)


def test_a_swap_takes_the_sequences_sent_right_after_it(core: Core, model_store: Store) -> None:
    v1, timings, facts = core.reply(core.call("start", model_store.v1, time.monotonic()))
    assert v1.version_id == model_store.v1
    # Told of before the answer (once loaded, before the warm-up), for the API's tokenizer.
    assert [view.version_id for view in core.loaded] == [model_store.v1]
    assert core.loaded[0].tokenizer.files == v1.tokenizer.files
    assert {"load", "warmup", "decode_path"} <= set(timings)
    assert facts.decode_path == "dynamic"
    core.submit(1, v1)
    core.until_ended(1)
    assert isinstance(core.events[1][-1], Finished)

    v2 = core.reply(core.call("load", model_store.v2))
    assert [view.version_id for view in core.loaded] == [model_store.v1, model_store.v2]
    # The API sends the swap, then at once a sequence for the next version (and nothing for
    # the old one): the engine must take it, however soon it comes after the swap.
    swap = core.call("swap", model_store.v2)
    core.submit(2, v2)
    previous, _ = core.reply(swap)
    assert previous == model_store.v1
    core.until_ended(2)
    assert isinstance(core.events[2][-1], Finished), core.events[2]
    assert core.text(2) != core.text(1), "v2's weights answered"
    # A version it no longer holds: refused (the API prepares the sequence again).
    core.submit(3, v1)
    core.until_ended(3)
    assert core.events[3] == [Failed(503, "the model was replaced; retry")]


@pytest.mark.parametrize(
    ("modeling", "decode_mode", "built_by"),
    [
        ("auto", "static", "metalserve"),
        ("transformers", "static", "transformers"),
        ("auto", "auto", "transformers"),  # the CPU's auto: the dynamic path, which needs it
    ],
)
def test_whose_modules_a_host_builds(
    model_store: Store, modeling: str, decode_mode: str, built_by: str
) -> None:
    """The host builds metalserve's modules where the engine runs the model on the static path
    only, unless ``--modeling transformers``; a swap to the next version keeps the choice."""
    settings = ServeSettings(
        store=model_store.root,
        model=MODEL,
        version=model_store.v1,
        modeling=modeling,
        decode_mode=decode_mode,
    )
    core = Core(settings)
    try:
        v1, _, facts = core.reply(core.call("start", model_store.v1, time.monotonic()))
        assert v1.modeling == facts.modeling == built_by
        assert facts.decode_path == ("dynamic" if decode_mode == "auto" else "static")
        core.submit(1, v1)
        core.until_ended(1)
        assert isinstance(core.events[1][-1], Finished)
        v2 = core.reply(core.call("load", model_store.v2))
        assert v2.modeling == built_by
    finally:
        core.conn.close()
        core.proc.wait(timeout=30)


def test_heartbeats_cancellation_and_stop(core: Core, model_store: Store) -> None:
    v1, _, _ = core.reply(core.call("start", model_store.v1, time.monotonic()))
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    core.submit(1, v1, long)
    while not core.events.get(1):
        core.read()
    core.conn.send(Cancel(1))
    core.until_ended(1)
    assert core.events[1][-1] == Failed(499, "client went away")
    assert len(core.ended[1].generated) < 400
    # What its observer saw comes over for the API's metrics: its passes, its collections too.
    assert {"forward_pass", "engine_state", "first_token", "sequence_finished"} <= set(
        core.observed
    )
    assert "gc_pause" in core.observed, "its own collections stop its engine thread"
    beats = len(core.beats)
    deadline = time.monotonic() + 5
    while len(core.beats) < beats + 3:  # every 0.2 s, idle too
        assert time.monotonic() < deadline, "no heartbeats"
        core.read()
    assert core.beats[-1] > core.beats[beats]
    assert core.reply(core.call("stop")) is None
    assert core.proc.wait(timeout=30) == 0


def read_other(other: Connection, until: type) -> tuple[Any, list[Any]]:
    """Another API process's messages until one of type ``until``: it, and all read."""
    read: list[Any] = []
    deadline = time.monotonic() + READ_SECONDS
    while time.monotonic() < deadline:
        assert other.poll(READ_SECONDS), "the engine's process told it nothing"
        message = other.recv()
        read.append(message)
        if isinstance(message, until):
            return message, read
    raise AssertionError(f"no {until.__name__}")


def ended_events(other: Connection, *rids: int) -> dict[int, list[Any]]:
    """Another API process's events of sequences ``rids`` until they ended (a text delta as
    its text)."""
    events: dict[int, list[Any]] = {rid: [] for rid in rids}
    ended: set[int] = set()
    while ended != set(rids):
        step, _ = read_other(other, Step)
        for rid, event in step.events:
            events[rid].append(event)
        ended |= {rid for rid, _ in step.ended}
    return events


def test_another_api_process_is_told_each_version_and_a_swap_waits_for_it(
    model_store: Store,
) -> None:
    settings = ServeSettings(store=model_store.root, model=MODEL, version=model_store.v1)
    core = Core(settings, others=1)
    (other,) = core.others
    try:
        start = core.call("start", model_store.v1, time.monotonic())
        loaded, _ = read_other(other, Loaded)
        live, _ = read_other(other, Live)
        assert loaded.view.version_id == live.view.version_id == model_store.v1
        # Ready means every API process can serve: the start answers once the other switched.
        deadline = time.monotonic() + 1.0
        while core.conn.poll(max(0.0, deadline - time.monotonic())):
            assert not isinstance(core.read(), Reply), "answered before the other switched"
        other.send(Switched(model_store.v1))
        v1, _, _ = core.reply(start)
        prompt = v1.encode("The quick brown fox", add_special_tokens=True)
        other.send(Submit(1, v1.version_id, prompt, GREEDY, "test", time.monotonic()))
        theirs = ended_events(other, 1)[1]
        core.submit(1, v1)  # the same ids: each API process's own
        core.until_ended(1)
        assert "".join(e for e in theirs if isinstance(e, str)) == core.text(1)

        v2 = core.reply(core.call("load", model_store.v2))
        swap = core.call("swap", model_store.v2)
        read_other(other, Live)
        # Before it switched: one it prepared for the old version (sent before it was told),
        # and one for the next (sent once switched, before the engine swapped): both run.
        other.send(Submit(2, v1.version_id, prompt, GREEDY, "test", time.monotonic()))
        other.send(Submit(3, v2.version_id, prompt, GREEDY, "test", time.monotonic()))
        other.send(Switched(model_store.v2))
        previous, _ = core.reply(swap)
        assert previous == model_store.v1
        both = ended_events(other, 2, 3)
        old, new = both[2], both[3]
        assert isinstance(old[-1], Finished), old
        assert isinstance(new[-1], Finished), new
        text = "".join(e for e in old if isinstance(e, str))
        assert text == core.text(1), "the old version answered the old one's sequence"
        assert "".join(e for e in new if isinstance(e, str)) != text
        # That API process gone: the engine goes on for the first one.
        other.close()
        core.submit(4, v2)
        core.until_ended(4)
        assert isinstance(core.events[4][-1], Finished)
    finally:
        core.conn.close()
        core.proc.wait(timeout=30)


def unasked_engine_process() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """An engine's process as ``spawn`` starts it, before the API's first message; its stderr
    piped."""
    ours, theirs = socket.socketpair()
    with theirs:
        proc = subprocess.Popen(
            [sys.executable, "-m", "metalserve.core.process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=server_env(),
            stderr=subprocess.PIPE,
        )
    return ours, proc


def test_an_engine_process_asked_nothing_ends_quietly_when_the_api_goes() -> None:
    """The API process gone before its first message (``serve`` failed after the spawn): the
    engine's process ends at its EOF, status 0, no traceback."""
    ours, proc = unasked_engine_process()
    ours.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (/proc's SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    raise AssertionError(f"no SigCgt for {pid}")


def test_a_stack_dump_asked_during_the_imports_ends_nothing() -> None:
    """The API's watchdog asks for the engine's stacks (SIGUSR1) once its loop has not beaten
    for half the watchdog's interval, counted from the API's take-over of the spawned process
    (``RemoteEngine.start``): on a loaded host that came while the engine's process still
    imported torch, before its first message, and SIGUSR1's default action ended it (exit -10:
    the replica never loaded). Its handler comes first now."""
    ours, proc = unasked_engine_process()
    with ours:
        deadline = time.monotonic() + 60
        while not catches(proc.pid, signal.SIGUSR1):
            assert proc.poll() is None, "ended before it caught SIGUSR1"
            assert time.monotonic() < deadline, "no SIGUSR1 handler before its first message"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"most recent call first" in err, err.decode()  # faulthandler's dump


def test_stopping_an_engine_process_that_still_imports_kills_it_at_once(
    model_store: Store,
) -> None:
    """A replica stopped before its engine's process read its first message (that process
    imports torch first: 1-4 s on a loaded host) has nothing there to drain or release: the
    API ends it at once instead of sending a stop it would read only after its imports (CI
    saw a SIGTERM'd replica take 5.6 s so)."""
    from metalserve.core.client import RemoteEngine
    from metalserve.core.spawn import EngineProcess
    from metalserve.metrics import Metrics
    from metalserve.relay import EventRelay

    ours, theirs = socket.socketpair()
    with theirs:  # a stand-in that never reads: the imports, forever
        proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"], pass_fds=(theirs.fileno(),)
        )
    settings = ServeSettings(store=model_store.root, model=MODEL, version=model_store.v1)
    engine = RemoteEngine(
        settings,
        Metrics(),
        EventRelay(),
        reload_headroom=False,
        spawned=EngineProcess(proc, Connection(ours.detach())),
    )
    engine.start()
    started = time.monotonic()
    engine.stop(timeout=5)
    assert time.monotonic() - started < 2
    assert proc.returncode == -signal.SIGKILL


def test_the_engine_process_gets_none_of_systemds_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Started before the API reads systemd's variables (and removes them from its own
    environment), the engine's process must not see them: it is not the service."""
    from metalserve.core.spawn import spawn_engine_process
    from metalserve.sdnotify import ENV_VARIABLES

    for name in ENV_VARIABLES:
        monkeypatch.setenv(name, "/run/systemd/notify" if name == "NOTIFY_SOCKET" else "1")
    spawned = spawn_engine_process()
    try:
        # Popen returns once the exec began: its new environment may not be in place yet.
        deadline = time.monotonic() + 10
        while not (raw := Path(f"/proc/{spawned.process.pid}/environ").read_bytes()):
            assert time.monotonic() < deadline, "no environment"
            time.sleep(0.01)
        environ = raw.split(b"\0")
        names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
        assert "PATH" in names
        assert not names & set(ENV_VARIABLES)
    finally:
        spawned.abandon()


def test_the_engine_process_freezes_its_heap_after_answering_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The start call's answer leaves before the engine's process freezes its heap: that full
    collection (0.10-0.12 s at 8B on an H100) is no part of the time to ready."""
    from types import SimpleNamespace

    from metalserve.core import process

    sent: list[object] = []
    frozen_after: list[list[object]] = []
    monkeypatch.setattr(process, "freeze_heap", lambda: frozen_after.append(list(sent)))

    async def start(version_id: str, timings: dict[str, float], loaded: Any) -> Any:
        return SimpleNamespace(view=lambda: f"view of {version_id}")

    core: Any = SimpleNamespace(
        imported_at=0.0,
        _loaded=None,
        host=SimpleNamespace(start=start),
        models={},
        clients=[None],  # the first API process alone
        facts=lambda: "facts",
        send=sent.append,
    )

    async def answer_start() -> None:
        await process.Core._answer(core, 7, process.Core.call_start(core, "v1", 0.0))
        assert frozen_after == []  # not yet: in the loop's next turn
        await asyncio.sleep(0)

    asyncio.run(answer_start())
    assert len(sent) == 1
    reply = sent[0]
    assert isinstance(reply, Reply)
    assert reply.cid == 7
    assert reply.value[0] == "view of v1"
    assert frozen_after == [sent], "froze before the answer left"


def test_the_api_side_gets_each_version_once_loaded_and_serves_that_view(
    model_store: Store,
) -> None:
    """The engine's process tells of a version once it is loaded, before its warm-up, and the
    API's side builds its tokenizer from that view meanwhile: the start and load calls then
    return that same view (what was begun with it kept), not the answer's copy."""
    from metalserve.core.client import CoreClient
    from metalserve.metrics import Metrics
    from metalserve.relay import EventRelay

    settings = ServeSettings(store=model_store.root, model=MODEL, version=model_store.v1)
    client = CoreClient(settings, Metrics(), EventRelay(), reload_headroom=False)
    told: list[ModelView] = []

    async def start_and_load() -> tuple[ModelView, ModelView]:
        first = await client.start(model_store.v1, {}, loaded=told.append)
        assert [view.version_id for view in told] == [model_store.v1]
        second = await client.load_next(model_store.v2, loaded=told.append)
        return first, second

    client.engine.start()
    try:
        first, second = asyncio.run(start_and_load())
    finally:
        client.engine.stop(timeout=30)
    assert [view.version_id for view in told] == [model_store.v1, model_store.v2]
    assert first is told[0]
    assert second is told[1]


def test_the_api_process_imports_neither_torch_nor_transformers(model_store: Store) -> None:
    """The API's process of an engine-process replica (a fresh interpreter) starts the engine,
    takes the version's view and tokenizes, renders a chat and writes a token's text with
    neither torch nor transformers imported: the view names its device, and the tiny model's
    tokenizer, read for the static path (the Llama family's, as on CUDA), is the API side's own
    (``tokenization.own_form``)."""
    script = f"""
import asyncio, sys
from metalserve.core.client import CoreClient
from metalserve.metrics import Metrics
from metalserve.relay import EventRelay
from metalserve.settings import ServeSettings
settings = ServeSettings(
    store={str(model_store.root)!r}, model={MODEL!r}, version={model_store.v1!r},
    decode_mode="static",
)
client = CoreClient(settings, Metrics(), EventRelay(), reload_headroom=False)
client.engine.start()
try:
    view = asyncio.run(client.start({model_store.v1!r}, {{}}))
    tokenizer = view.tokenizer
    ids = tokenizer.encode("Hello", add_special_tokens=True)
    chat = tokenizer.render_chat([{{"role": "user", "content": "Hi"}}])
    text = tokenizer.token_text(ids[-1])
finally:
    client.engine.stop(timeout=30)
print(view.device, view.dtype, tokenizer.own_api_form, bool(chat and text))
print(sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
        env=server_env(),
    )
    assert done.stdout.splitlines()[-2:] == ["cpu float32 True True", "[]"], (
        done.stdout + done.stderr
    )
