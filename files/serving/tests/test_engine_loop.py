"""metalserve.engine.loop: model swaps, abort, and failed steps stopping the engine."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from engine_helpers import PROMPTS, alone, submit
from metalserve.engine import Engine, Failed, Finished, StaleModelError
from metalserve.loader import LoadedModel
from metalserve.sampling import SamplingParams


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


def test_a_failed_step_stops_a_tensor_parallel_engine_at_once(v1: LoadedModel) -> None:
    """Rank 0 of a tensor-parallel replica (here the rank of one): after a failed step the other
    ranks may be inside its collectives or past it, so the engine stops on the first failure
    (the replica reports dead and restarts whole), not after MAX_CONSECUTIVE_FAILURES."""
    from metalserve.tensor_parallel import TensorParallel

    eng = Engine(max_batch_size=2, decode_mode="static")
    eng.tensor_parallel = TensorParallel(0, 1)
    eng.start()
    try:
        eng.swap(v1).result(timeout=30)
        assert eng.decode_path == "static"

        def fail() -> None:
            raise RuntimeError("a collective failed")

        eng._batch.step = fail  # type: ignore[method-assign, union-attr]
        event = submit(eng, v1, "Hi")[1].wait()
        assert isinstance(event, Failed)
        assert event.status == 500
        deadline = time.monotonic() + 10
        while eng.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not eng.is_alive(), "one failed step stops a tensor-parallel engine"
    finally:
        eng.stop()


def test_the_engine_reports_running_waiting_and_cache_usage(v1: LoadedModel) -> None:
    """With one slot and two requests: one runs, one waits, the running one fills its slot's
    share of the capacity; at the end nothing runs or waits and both were queued."""
    from metalserve.metrics import Metrics

    metrics = Metrics()
    eng = Engine(max_batch_size=1, observer=metrics, step_delay=0.05)
    eng.start()
    try:
        eng.swap(v1).result(timeout=10)
        params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
        first, sink = submit(eng, v1, PROMPTS[0], params)
        _, sink2 = submit(eng, v1, PROMPTS[1], params)

        def value(name: str) -> float:
            return metrics.registry.get_sample_value(name) or 0.0

        deadline = time.monotonic() + 10
        while not (value("metalserve_num_requests_running") == 1 and first.generated):
            assert time.monotonic() < deadline, "no running sequence reported"
            time.sleep(0.01)
        assert value("metalserve_num_requests_waiting") == 1
        usage = value("metalserve_kv_cache_usage_perc")
        assert 0 < usage <= (len(first.prompt_ids) + 20) / v1.max_context
        sink.wait()
        sink2.wait()
        deadline = time.monotonic() + 5
        while value("metalserve_num_requests_running") != 0:
            assert time.monotonic() < deadline, "the finished sequence still counts as running"
            time.sleep(0.01)
        assert value("metalserve_num_requests_waiting") == 0
        assert value("metalserve_kv_cache_usage_perc") == 0
        assert value("metalserve_request_queue_time_seconds_count") == 2
    finally:
        eng.stop()


class _Calls:
    """An engine observer that records the calls it gets, by name."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: self.calls.append(name)


def test_a_first_version_is_warmed_up_on_the_batch_it_serves_with(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``swap(warm_up=True)`` (a start) proves the new batch generates before it goes live;
    its tokens and passes are not served ones (no metrics, no forward passes counted)."""
    from metalserve.engine import loop

    warmed: list[object] = []
    generate = loop.generate_once

    def recording(*args: Any) -> str:
        warmed.append(args[-1])  # the batch it ran on
        return generate(*args)

    monkeypatch.setattr(loop, "generate_once", recording)
    observer = _Calls()
    eng = Engine(max_batch_size=4, observer=observer)  # type: ignore[arg-type]
    eng.start()
    try:
        assert eng.swap(v1, warm_up=True).result(timeout=30) is None
        assert eng.warmup_seconds > 0
        assert warmed == [eng._batch]
        assert eng.forward_passes == 0
        assert not {"forward_pass", "first_token", "sequence_finished"} & set(observer.calls)
        _, sink = submit(eng, v1, PROMPTS[0])
        assert isinstance(sink.wait(30), Finished)
        assert eng.forward_passes > 0
        assert "forward_pass" in observer.calls
    finally:
        eng.stop()


def test_a_failed_warm_up_stops_the_swap(v1: LoadedModel) -> None:
    eng = Engine(max_batch_size=4)
    eng.start()
    try:
        broken = dataclasses.replace(v1, model=_Exploding())
        with pytest.raises(RuntimeError, match="fell off the bus"):
            eng.swap(broken, warm_up=True).result(timeout=30)
        assert eng.model is None
    finally:
        eng.stop()
