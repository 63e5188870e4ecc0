from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from metalserve.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def test_each_app_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.forward_pass("decode", 4, 0.004, {})
    assert samples(a)[("metalserve_forward_passes_total", (("phase", "decode"),))] == 1
    assert ("metalserve_forward_passes_total", (("phase", "decode"),)) not in samples(b)


def test_model_info_names_only_the_current_version() -> None:
    metrics = Metrics()
    metrics.set_model("tiny", "a" * 64)
    metrics.set_model("tiny", "b" * 64)
    info = {k: v for k, v in samples(metrics).items() if k[0] == "metalserve_model_info"}
    assert info == {("metalserve_model_info", (("model", "tiny"), ("version", "b" * 64))): 1.0}


def test_the_other_api_processes_requests_add_to_the_first_ones() -> None:
    first, other = Metrics(), Metrics()
    first.requests.labels(endpoint="/v1/completions", status="200").inc(3)
    first.request_latency.labels(endpoint="/v1/completions").observe(0.02)
    first.in_flight.set(1)
    first.first_token("completions", 0.01)  # the engine's: told to the first process only
    other.requests.labels(endpoint="/v1/completions", status="200").inc(2)
    other.requests.labels(endpoint="/v1/chat/completions", status="400").inc()
    other.request_latency.labels(endpoint="/v1/completions").observe(0.3)
    other.in_flight.set(4)
    other.ready.set(1)  # its own readiness and version are not the replica's
    other.set_model("tiny", "b" * 64)
    first.set_model("tiny", "a" * 64)
    created = {k: v for k, v in samples(first).items() if k[0].endswith("_created")}
    texts = [other.render()]
    first.add_other_processes(lambda: texts)
    merged = samples(first)
    completions = (("endpoint", "/v1/completions"), ("status", "200"))
    assert merged[("metalserve_requests_total", completions)] == 5
    chat_400 = (("endpoint", "/v1/chat/completions"), ("status", "400"))
    assert merged[("metalserve_requests_total", chat_400)] == 1, "a label set the first lacks"
    latency = (("endpoint", "/v1/completions"),)
    assert merged[("metalserve_request_duration_seconds_count", latency)] == 2
    assert merged[("metalserve_request_duration_seconds_sum", latency)] == pytest.approx(0.32)
    buckets = (("endpoint", "/v1/completions"), ("le", "0.025"))
    assert merged[("metalserve_request_duration_seconds_bucket", buckets)] == 1
    assert merged[("metalserve_in_flight_requests", ())] == 5
    assert merged[("metalserve_ready", ())] == 0
    info = {k for k in merged if k[0] == "metalserve_model_info"}
    assert info == {("metalserve_model_info", (("model", "tiny"), ("version", "a" * 64)))}
    ttft = (("endpoint", "completions"),)
    assert merged[("metalserve_time_to_first_token_seconds_count", ttft)] == 1
    assert {k: merged[k] for k in created} == created, "a creation time is not a sum"
    # One that does not answer is left out: the first process's own still come.
    texts.clear()
    assert samples(first)[("metalserve_requests_total", completions)] == 3


def test_engine_observer_methods() -> None:
    metrics = Metrics()
    metrics.engine_state(running=5, waiting=3, kv_cache_usage=0.25)
    metrics.request_queued(0.02)
    metrics.first_token("chat", 0.2)
    metrics.sequence_finished("length", 7, 5)
    metrics.forward_pass("decode", 8, 0.004, {"host": 0.001, "wait": 0.003, "emit": 0.0005})
    metrics.forward_pass("decode", 6, 0.006, {"host": 0.002, "wait": 0.004, "emit": 0.0005})
    got = samples(metrics)
    decode = (("phase", "decode"),)
    host = (("part", "host"), ("phase", "decode"))
    assert got[("metalserve_forward_pass_part_seconds_count", host)] == 2
    assert abs(got[("metalserve_forward_pass_part_seconds_sum", host)] - 0.003) < 1e-9
    assert ("metalserve_forward_pass_part_seconds_count", (("part", "device"), *decode)) not in got
    assert got[("metalserve_forward_pass_duration_seconds_count", decode)] == 2
    assert abs(got[("metalserve_forward_pass_duration_seconds_sum", decode)] - 0.010) < 1e-9
    assert got[("metalserve_batch_size_sum", decode)] == 14
    assert got[("metalserve_num_requests_running", ())] == 5
    assert got[("metalserve_num_requests_waiting", ())] == 3
    assert got[("metalserve_kv_cache_usage_perc", ())] == 0.25
    assert got[("metalserve_request_queue_time_seconds_count", ())] == 1
    assert got[("metalserve_time_to_first_token_seconds_count", (("endpoint", "chat"),))] == 1
    assert got[("metalserve_prompt_tokens_total", ())] == 7
    assert got[("metalserve_generated_tokens_total", ())] == 5
    assert got[("metalserve_sequences_finished_total", (("reason", "length"),))] == 1


@pytest.fixture
def gc_every_allocation() -> Iterator[None]:
    """A collection at (nearly) every allocation, inside the metrics' own locks too."""
    threshold = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)


def test_a_collection_inside_a_metrics_lock_does_not_wait_for_itself(
    gc_every_allocation: None,
) -> None:
    """The reader thread of the engine's messages recorded the engine's collections while a
    collection of its own process could start, whose callback took the same (non-reentrant)
    lock: that thread, every scrape after it and the watchdog's heartbeats stopped for good."""
    metrics = Metrics()
    metrics.watch_gc()
    try:
        relay = threading.Thread(
            target=lambda: [metrics.gc_pause(g % 40, 0.001) for g in range(200)], daemon=True
        )
        relay.start()
        relay.join(timeout=20)
        assert not relay.is_alive(), "recording a collection waited for itself"
    finally:
        metrics.unwatch_gc()
    got = samples(metrics)
    relayed = sum(
        got[("metalserve_gc_pause_seconds_count", (("generation", str(g)),))] for g in range(3, 40)
    )
    assert relayed == 200 - 3 * 5  # generations 3..39 come only from the relayed calls
