"""Request spans: the caller's traceparent continued, one span per phase; nothing when off."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import MODEL, Store
from metalserve.api import create_app
from metalserve.replica import Replica
from metalserve.settings import ServeSettings
from metalserve.tracing import Tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _serve(model_store: Store, tracing: Tracing | None, *requests: dict) -> list[httpx.Response]:
    """Run the app in-process (engine, load, requests, stop); return the answers."""
    settings = ServeSettings(store=model_store.root, model=MODEL, version=model_store.v1)
    replica = Replica(settings, model_store.v1)
    replica.tracing = tracing
    app = create_app(settings, replica)

    async def run() -> list[httpx.Response]:
        replica.engine.start()
        try:
            await replica.load_initial()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://replica") as http:
                return [await http.post(**request) for request in requests]
        finally:
            await asyncio.to_thread(replica.engine.stop)

    return asyncio.run(run())


def test_a_request_continues_the_callers_trace_with_its_phases(model_store: Store) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "temperature": 0, "n": 1}
    answers = _serve(
        model_store,
        Tracing(provider),
        {
            "url": "/v1/completions",
            "json": body,
            "headers": {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        },
        {"url": "/v1/completions", "json": {**body, "stream": True}},
    )
    assert [a.status_code for a in answers] == [200, 200]
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.name == "POST /v1/completions"]
    assert len(servers) == 2
    traced, fresh = servers
    # The first continues the caller's trace, under the caller's span.
    assert format(traced.context.trace_id, "032x") == TRACE_ID
    assert traced.parent is not None
    assert format(traced.parent.span_id, "016x") == PARENT_ID
    assert traced.attributes["http.response.status_code"] == 200
    assert traced.attributes["metalserve.version"] == model_store.v1
    # The second (no traceparent) starts its own.
    assert fresh.parent is None
    assert fresh.context.trace_id != traced.context.trace_id
    for server in servers:
        children = {
            s.name: s
            for s in spans
            if s.parent is not None and s.parent.span_id == server.context.span_id
        }
        assert set(children) == {"queue", "prefill", "decode", "relay"}
        order = [children[n] for n in ("queue", "prefill", "decode", "relay")]
        for earlier, later in itertools.pairwise(order):
            assert earlier.end_time <= later.start_time + 1_000_000  # 1 ms of clock rounding
        assert server.start_time <= order[0].start_time
        assert order[-1].end_time <= server.end_time


def test_the_replica_imports_no_tracing_sdk_when_off(model_store: Store) -> None:
    """``metalserve serve`` without --otlp-endpoint: the SDK stays out of the process."""
    code = (
        "import sys; from metalserve.settings import ServeSettings; "
        "from metalserve.replica import Replica; from metalserve.api import create_app; "
        f"s = ServeSettings(store={str(model_store.root)!r}, model={MODEL!r}, "
        f"version={model_store.v1!r}); create_app(s, Replica(s, {model_store.v1!r})); "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
