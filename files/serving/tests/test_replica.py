"""The replica's state without a running engine: admission, reload guards, in-flight tracking."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
import uvloop

from conftest import MODEL, Store
from metalserve import server, skinny_linear
from metalserve.errors import ApiError
from metalserve.host import _free_memory
from metalserve.metrics import Metrics
from metalserve.replica import Replica, read_token
from metalserve.settings import ServeSettings


@pytest.fixture
def replica(model_store: Store) -> Replica:
    settings = ServeSettings(store=model_store.root, model=MODEL, version=model_store.v1)
    return Replica(settings, model_store.v1)


def test_read_token(tmp_path: Path) -> None:
    assert read_token(None) is None
    path = tmp_path / "token"
    path.write_text("  secret\n")
    assert read_token(path) == "secret"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(path)


def test_a_load_keeps_the_decode_timings_in_the_file_named(
    model_store: Store, tmp_path: Path
) -> None:
    """``--decode-tuning-file`` reaches the tuner once torch is imported (on CUDA the decode
    path built next reads and extends it; ``test_skinny_linear`` tests the file itself)."""
    path = tmp_path / "decode-tuning.json"
    settings = ServeSettings(
        store=model_store.root, model=MODEL, version=model_store.v1, decode_tuning_file=path
    )
    try:
        timings: dict[str, float] = {}
        bundle = Replica(settings, model_store.v1).host.load_and_warm(model_store.v1, timings)
        assert bundle.version_id == model_store.v1
        assert set(timings) == {"imports", "load", "warmup"}
        assert skinny_linear._file == path
    finally:
        skinny_linear.remember_in(None)


@pytest.mark.parametrize(("asked", "held"), [(64, 64), (4096, 512)], ids=["lower", "beyond"])
def test_max_context_caps_the_model_context(model_store: Store, asked: int, held: int) -> None:
    """``--max-context`` below the model's own (512) is the context a sequence holds (the
    prompt checks and the static cache follow ``max_context``); beyond it, the model's."""
    settings = ServeSettings(
        store=model_store.root, model=MODEL, version=model_store.v1, max_context=asked
    )
    bundle = Replica(settings, model_store.v1).host.load_and_warm(model_store.v1, {})
    assert bundle.max_context == held


def test_admission_needs_a_ready_replica(replica: Replica) -> None:
    assert replica.state() == "engine-dead"  # the engine thread was never started
    assert not replica.ready
    with pytest.raises(ApiError) as excinfo:
        replica.admit(MODEL)
    assert (excinfo.value.status, excinfo.value.code) == (503, "not_ready")
    replica.draining = True
    assert replica.state() == "draining"
    with pytest.raises(ApiError) as excinfo:
        replica.admit(MODEL)
    assert (excinfo.value.status, excinfo.value.code) == (503, "draining")


def test_reload_only_while_ready(replica: Replica) -> None:
    with pytest.raises(ApiError) as excinfo:
        asyncio.run(replica.reload("anything"))
    assert (excinfo.value.status, excinfo.value.code) == (409, "not_ready")
    replica.draining = True
    with pytest.raises(ApiError) as excinfo:
        asyncio.run(replica.reload("anything"))
    assert (excinfo.value.status, excinfo.value.code) == (503, "draining")


def test_wait_idle_follows_in_flight_requests(replica: Replica) -> None:
    async def main() -> None:
        assert await replica.wait_idle(0.01)
        replica.enter()
        assert not await replica.wait_idle(0.01)
        waiter = asyncio.create_task(replica.wait_idle(5))
        await asyncio.sleep(0)
        replica.leave()
        assert await waiter
        assert replica.in_flight == 0

    asyncio.run(main())


def test_freeing_a_replaced_model_collects_once_and_keeps_the_heap_frozen() -> None:
    """A reload unfreezes (a frozen object is never collected), collects the old model's cycles,
    and freezes again itself, so the server's freeze hook has nothing left to collect."""

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    dropped = weakref.ref(Cycle())  # unreachable, collectable only by a collection
    gc.freeze()
    try:
        assert dropped() is not None  # frozen with the rest
        _free_memory(SimpleNamespace(device=SimpleNamespace(type="cpu")))  # type: ignore[arg-type]
        assert dropped() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    _free_memory(SimpleNamespace(device=SimpleNamespace(type="cpu")))  # type: ignore[arg-type]
    assert gc.get_freeze_count() == 0  # nothing frozen before: nothing frozen after


def test_freeing_a_replaced_model_waits_for_a_graph_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hot reload's caller empties the CUDA cache of the replaced version while the engine
    thread may capture a deferred graph: torch's allocator asserts no capture is under way,
    so the release waits for the capture's lock (``staticdecode.CAPTURING``)."""
    import threading

    import torch

    from metalserve import staticdecode

    emptied: list[float] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(time.monotonic()))
    cuda = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    with staticdecode.CAPTURING:
        freeing = threading.Thread(target=_free_memory, args=(cuda,))
        freeing.start()
        time.sleep(0.2)
        assert emptied == [], "emptied the cache during a capture"
        released = time.monotonic()
    freeing.join(10)
    assert len(emptied) == 1
    assert emptied[0] >= released


def test_the_server_freezes_the_heap_once_ready_even_if_something_froze_objects_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU machine's interpreter starts with 375 objects frozen (even with -S and -I): the
    server must still freeze its heap once ready, and only once. It went by the freeze count,
    found it non-zero and never froze (0.4 s full collections while serving, at 8B); and that
    count walks every frozen object, so asking it on each 0.1 s tick would cost ~80 ms a tick
    wherever the freeze did happen."""
    calls: list[int] = []
    monkeypatch.setattr(server, "freeze_heap", lambda: calls.append(1))

    def count_frozen() -> int:  # walks the whole permanent generation: ~80 ms at 750k objects
        raise AssertionError("gc.get_freeze_count() on every tick")

    monkeypatch.setattr(gc, "get_freeze_count", count_frozen)
    replica = SimpleNamespace(ready=False, metrics=Metrics())
    config = uvicorn.Config(app=lambda scope, receive, send: None)
    draining = server.DrainingServer(config, replica, freeze_heap=True)  # type: ignore[arg-type]
    gc.freeze()  # what the interpreter's start-up did there
    try:
        asyncio.run(draining.on_tick(1))
        assert calls == []  # not ready yet
        replica.ready = True
        for counter in (2, 3, 4):
            asyncio.run(draining.on_tick(counter))
        assert calls == [1]
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_the_event_loop_lag_is_how_late_each_tick_ran(run: Callable[[Any], None]) -> None:
    """uvicorn's own main loop, ticking every 0.1 s: a loop held up for 0.3 s (as by a flood of
    streams' events) shows as one tick about that late; the free ticks are on time. On the
    replica's loop (uvloop) too."""
    metrics = Metrics()
    replica = SimpleNamespace(ready=False, metrics=metrics)
    config = uvicorn.Config(app=lambda scope, receive, send: None)
    draining = server.DrainingServer(config, replica)  # type: ignore[arg-type]

    async def held_up_once() -> None:
        ticking = asyncio.create_task(draining.main_loop())
        await asyncio.sleep(0.45)
        time.sleep(0.3)  # nothing else runs on the loop meanwhile
        await asyncio.sleep(0.45)
        draining.should_exit = True
        await ticking

    run(held_up_once())
    count = sample_value(metrics, "metalserve_event_loop_lag_seconds_count")
    late = count - sample_value(metrics, "metalserve_event_loop_lag_seconds_bucket", le="0.1")
    assert count >= 6
    assert late == 1
    assert 0.15 <= sample_value(metrics, "metalserve_event_loop_lag_seconds_sum") < 0.5


def sample_value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, name
    return value
