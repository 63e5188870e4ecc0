"""The probe routes (health, readiness, version, metrics), against a real server."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    GREEDY,
    MODEL,
    TEST_DEVICE,
    Store,
    assert_openai_error,
    complete,
    metric_samples,
)
from metalserve.loader import LOAD_PARTS

pytestmark = pytest.mark.e2e


def test_health_ready_version(client: httpx.Client, model_store: Store) -> None:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["version_id"] == model_store.v1
    version = client.get("/version").json()
    assert version["model"] == MODEL
    assert version["version_id"] == model_store.v1
    assert version["verified"] is True
    assert version["device"] == TEST_DEVICE
    assert version["loaded_at"]
    assert version["server_version"]
    assert "model.safetensors" in version["files"]
    # The CPU defaults: the engine a thread, the dynamic path, nothing compiled.
    assert version["engine_process"] is False
    assert (version["decode_path"], version["decode_compiled"]) == ("dynamic", False)
    assert version["decode_gemm"] == []  # nothing timed: no CUDA
    assert version["prefix_cache_tokens"] == 0  # the dynamic path has none
    # The server's --max-batch-size (the dynamic path holds every one) and the model's context.
    assert (version["max_batch_size"], version["max_context"]) == (8, 512)
    # Where the time to ready went: the phases after the process's start add up to at most it.
    startup = version["startup_seconds"]
    phases = ["process_start", "imports", "load", "warmup", "decode_path", "tokenizer"]
    assert list(startup) == [*phases, "ready"]
    assert all(seconds >= 0 for seconds in startup.values()), startup
    assert startup["load"] == version["load_seconds"]
    assert list(version["load_parts_seconds"]) == list(LOAD_PARTS)
    assert version["load_parts_seconds"]["weights"] == version["weights_seconds"]
    assert sum(startup[phase] for phase in phases) <= startup["ready"] + 0.01, startup


def test_metrics(client: httpx.Client, model_store: Store) -> None:
    first_event = ("metalserve_time_to_first_byte_seconds_{}", (("endpoint", "completions"),))
    ttft = ("metalserve_time_to_first_token_seconds_{}", (("endpoint", "completions"),))

    def grew(
        metric: tuple[str, tuple[tuple[str, str], ...]],
        kind: str,
        before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
        after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    ) -> float:
        key = (metric[0].format(kind), metric[1])
        return after.get(key, 0.0) - before.get(key, 0.0)

    # A streamed completion's first event is timed from the request's arrival: no sooner than
    # its first token, which is timed from the sequence's submission.
    start = metric_samples(client)
    streaming = {**GREEDY, "prompt": "Hi", "stream": True}
    with client.stream("POST", "/v1/completions", json=streaming) as r:
        assert r.status_code == 200
        r.read()
    streamed = metric_samples(client)
    assert grew(first_event, "count", start, streamed) == grew(ttft, "count", start, streamed) == 1
    assert grew(first_event, "sum", start, streamed) >= grew(ttft, "sum", start, streamed) > 0
    # Not timed: an answer not streamed (its first byte is its last), a chat stream (its first
    # event announces the role, before any token), an error.
    complete(client, "Hi")
    chat = {**GREEDY, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=chat) as r:
        assert r.status_code == 200
        r.read()
    client.post("/v1/completions", json={"model": "nope", "prompt": "Hi"})
    rest = metric_samples(client)
    assert grew(first_event, "count", streamed, rest) == 0
    assert grew(ttft, "count", streamed, rest) == 1
    response = client.get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in [
        "metalserve_requests",
        "metalserve_request_duration_seconds",
        "metalserve_time_to_first_token_seconds",
        "metalserve_time_to_first_byte_seconds",
        "metalserve_prompt_tokens",
        "metalserve_generated_tokens",
        "metalserve_batch_size",
        "metalserve_num_requests_running",
        "metalserve_num_requests_waiting",
        "metalserve_kv_cache_usage_perc",
        "metalserve_request_queue_time_seconds",
        "metalserve_in_flight_requests",
        "metalserve_forward_passes",
        "metalserve_model_info",
        "metalserve_startup_seconds",
    ]:
        assert name in families, name
    samples = metric_samples(client)
    key = ("metalserve_model_info", (("model", MODEL), ("version", model_store.v1)))
    assert samples[key] == 1.0
    ok = ("metalserve_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    not_found = ("metalserve_requests_total", (("endpoint", "/v1/completions"), ("status", "404")))
    assert samples[ok] >= 1
    assert samples[not_found] >= 1
    assert samples[("metalserve_generated_tokens_total", ())] >= 12
    assert samples[("metalserve_in_flight_requests", ())] == 0


def test_liveness_follows_the_engine_thread(model_store: Store) -> None:
    """Without a running engine (here: lifespan not started) the replica is neither alive nor
    ready, and inference is refused with 503. In-process on purpose: a real process cannot be
    made to lose its engine thread from outside."""
    from metalserve.api import create_app
    from metalserve.replica import Replica
    from metalserve.settings import ServeSettings

    settings = ServeSettings(store=model_store.root, model=MODEL, version=model_store.v1)
    app = create_app(settings, Replica(settings, model_store.v1))

    async def probe() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as http:
            health = await http.get("/healthz")
            assert health.status_code == 503
            assert health.json()["status"] == "engine-dead"
            assert (await http.get("/readyz")).status_code == 503
            refused = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
            assert_openai_error(refused, 503)
            version = (await http.get("/version")).json()
            assert version["verified"] is False
            assert version["loaded_at"] is None

    asyncio.run(probe())
