"""``metalserve.triton_warmup``: Triton's per-process set-up begun once, in a thread of its own,
and waited for by the first launch (with stand-in Triton modules: this suite runs without Triton
or CUDA; BENCHMARKS round 2 step 32 measured the real one on an H100)."""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from metalserve import triton_warmup


@dataclass
class StandIn:
    """The threads that computed Triton's key (one entry a call); ``release`` lets it finish."""

    computed: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    """Triton's cache module and launcher package as stand-ins, the key held until released."""
    state = StandIn()

    def triton_key() -> str:
        state.release.wait(10)
        state.computed.append(threading.current_thread().name)
        return "key"

    cache = types.ModuleType("triton.runtime.cache")
    cache.triton_key = triton_key  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton.runtime.cache", cache)
    monkeypatch.setitem(
        sys.modules, "triton.experimental.gluon", types.ModuleType("triton.experimental.gluon")
    )
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "triton" else found(name, *a),
    )
    monkeypatch.setattr(triton_warmup, "_thread", None)
    yield state
    state.release.set()
    if triton_warmup._thread is not None:
        triton_warmup._thread.join(10)


def test_the_set_up_runs_once_in_its_own_thread_and_the_launch_waits_for_it(
    stand_in: StandIn,
) -> None:
    triton_warmup.begin()
    first = triton_warmup._thread
    assert first is not None
    assert first.daemon
    triton_warmup.begin()  # once per process
    assert triton_warmup._thread is first
    assert stand_in.computed == []  # held: the key is still being computed
    stand_in.release.set()
    triton_warmup.wait()
    assert stand_in.computed == ["metalserve-triton-warmup"]
    assert not first.is_alive()


def test_nothing_begins_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else found(name, *a)
    )
    monkeypatch.setattr(triton_warmup, "_thread", None)
    triton_warmup.begin()
    assert triton_warmup._thread is None
    triton_warmup.wait()  # returns at once
