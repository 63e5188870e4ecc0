from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from metalserve.engine import (
    Engine,
    Event,
    Failed,
    Finished,
    Sequence,
    StaleModelError,
    TextDelta,
    generate_once,
)
from metalserve.loader import LoadedModel
from metalserve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [
    "The quick brown fox",
    "Hi",
    "Metal servers hum in the data center while models answer questions",
    "What is two plus two?",
    "Once",
    "Write a short poem about the moon.",
]


class Collector:
    """Sink of one sequence; waits for its terminal event."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()
        self.first = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.first.set()
        if not isinstance(event, TextDelta):
            self.done.set()

    def wait(self, timeout: float = 30.0) -> Event:
        assert self.done.wait(timeout), "sequence did not finish"
        return self.events[-1]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))


def submit(
    engine: Engine, bundle: LoadedModel, prompt: str, params: SamplingParams = GREEDY
) -> tuple[Sequence, Collector]:
    sink = Collector()
    seq = Sequence(
        bundle=bundle,
        prompt_ids=bundle.encode(prompt, add_special_tokens=True),
        params=params,
        sink=sink,
    )
    engine.submit(seq)
    return seq, sink


def alone(bundle: LoadedModel, prompt: str, params: SamplingParams = GREEDY) -> str:
    return generate_once(bundle, bundle.encode(prompt, add_special_tokens=True), params)


@pytest.fixture
def engine(v1: LoadedModel) -> Iterator[Engine]:
    eng = Engine(max_batch_size=4)
    eng.start()
    eng.swap(v1).result(timeout=10)
    yield eng
    eng.stop()


def test_batched_outputs_equal_solo_outputs(engine: Engine, v1: LoadedModel) -> None:
    expected = [alone(v1, p) for p in PROMPTS]

    # Three start together; the rest join while those are mid-generation (continuous batching,
    # different cache lengths), and the batch limit (4) makes two of them wait in the queue.
    first = [submit(engine, v1, p) for p in PROMPTS[:3]]
    first[0][1].first.wait(10)
    later = [submit(engine, v1, p) for p in PROMPTS[3:]]
    sinks = [s for _, s in first + later]
    for sink in sinks:
        assert isinstance(sink.wait(), Finished)

    assert [s.text for s in sinks] == expected
    sequential_passes = len(PROMPTS) * GREEDY.max_tokens
    assert engine.forward_passes < sequential_passes * 0.6


def test_seeded_sampling_does_not_depend_on_batch_mates(engine: Engine, v1: LoadedModel) -> None:
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    expected = alone(v1, PROMPTS[0], sampled)
    others = [
        submit(engine, v1, p, dataclasses.replace(sampled, seed=i))
        for i, p in enumerate(PROMPTS[1:4])
    ]
    _, target = submit(engine, v1, PROMPTS[0], sampled)
    target.wait()
    for _, sink in others:
        sink.wait()
    assert target.text == expected
    assert expected != alone(v1, PROMPTS[0], dataclasses.replace(sampled, seed=99))


def test_finish_reasons_and_usage(engine: Engine, v1: LoadedModel) -> None:
    _, sink = submit(
        engine, v1, "Hi", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    )
    finished = sink.wait()
    assert finished == Finished("length", len(v1.encode("Hi", add_special_tokens=True)), 5)

    full = alone(v1, "Hi", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    stop = full[5:8]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    _, sink = submit(
        engine,
        v1,
        "Hi",
        SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,), ignore_eos=True),
    )
    finished = sink.wait()
    assert isinstance(finished, Finished)
    assert finished.reason == "stop"
    assert sink.text == full[: full.index(stop)]


def test_eos_ends_a_sequence(v1: LoadedModel) -> None:
    eos = next(iter(v1.eos_token_ids))
    events: list[Event] = []
    params = SamplingParams(max_tokens=5, temperature=0.0)
    seq = Sequence(bundle=v1, prompt_ids=[1], params=params, sink=events.append)
    seq.start()
    seq.append(eos, None)
    assert events == [Finished("stop", 1, 1)]

    # ignore_eos (benchmarks): the EOS token is just another token.
    events.clear()
    seq = Sequence(bundle=v1, prompt_ids=[1], params=GREEDY, sink=events.append)
    seq.start()
    seq.append(eos, None)
    assert not seq.done


def test_cancelled_sequence_is_dropped(v1: LoadedModel) -> None:
    eng = Engine(max_batch_size=4, step_delay=0.01)
    eng.start()
    try:
        eng.swap(v1).result(timeout=10)
        long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        seq, sink = submit(eng, v1, "Hi", long)
        _, short = submit(eng, v1, "Once", SamplingParams(max_tokens=3, temperature=0.0))
        sink.first.wait(10)
        seq.cancel()
        event = sink.wait(10)
        assert isinstance(event, Failed)
        assert event.status == 499
        assert len(seq.generated) < 100
        assert isinstance(short.wait(), Finished)
    finally:
        eng.stop()


def test_swap_lets_in_flight_sequences_finish_on_the_old_model(
    v1: LoadedModel, v2: LoadedModel
) -> None:
    eng = Engine(max_batch_size=4, step_delay=0.005)
    eng.start()
    try:
        eng.swap(v1).result(timeout=10)
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        _, old_sink = submit(eng, v1, PROMPTS[0], params)
        old_sink.first.wait(10)

        swapped = eng.swap(v2)
        assert eng.target_model is v2
        assert eng.model is v1
        # Prepared for the incoming model: waits until the old model's work is done.
        _, new_sink = submit(eng, v2, PROMPTS[0], params)
        assert swapped.result(timeout=30) is v1
        assert isinstance(old_sink.wait(), Finished)
        assert isinstance(new_sink.wait(), Finished)

        assert old_sink.text == alone(v1, PROMPTS[0], params)
        assert new_sink.text == alone(v2, PROMPTS[0], params)
        assert old_sink.text != new_sink.text
        assert eng.model is v2
        # Prepared for the replaced model (e.g. tokenized during the swap): refused, the API
        # prepares it again for the new one.
        with pytest.raises(StaleModelError):
            submit(eng, v1, PROMPTS[0], params)
    finally:
        eng.stop()


def test_abort_all_fails_running_and_queued(v1: LoadedModel) -> None:
    eng = Engine(max_batch_size=1, step_delay=0.01)
    eng.start()
    try:
        eng.swap(v1).result(timeout=10)
        long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        _, running = submit(eng, v1, "Hi", long)
        _, queued = submit(eng, v1, "Hi", long)
        running.first.wait(10)
        eng.abort_all("shutting down")
        for sink in (running, queued):
            event = sink.wait(10)
            assert isinstance(event, Failed)
            assert event.status == 503
    finally:
        eng.stop()


class _Exploding:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("device fell off the bus")


def test_failed_steps_fail_requests_then_stop_the_engine(v1: LoadedModel) -> None:
    broken = dataclasses.replace(v1, model=_Exploding())
    eng = Engine(max_batch_size=4)
    eng.start()
    try:
        eng.swap(broken).result(timeout=10)
        _, sink = submit(eng, broken, "Hi")
        event = sink.wait()
        assert isinstance(event, Failed)
        assert event.status == 500
        assert eng.is_alive(), "one failed step must not kill the engine"
        for _ in range(2):
            submit(eng, broken, "Hi")[1].wait()
        deadline = time.monotonic() + 10
        while eng.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not eng.is_alive(), "repeated failures stop the engine (liveness turns 503)"
        with pytest.raises(RuntimeError):
            submit(eng, broken, "Hi")
    finally:
        eng.stop()
