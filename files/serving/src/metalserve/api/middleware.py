"""Request metrics, the in-flight count that the drain waits on, and request spans (tracing).

Pure ASGI, not ``BaseHTTPMiddleware``: streamed responses are timed to their last byte.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metalserve.replica import Replica

INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class ObservabilityMiddleware:
    """Counts requests by route and status, times them to the last byte, tracks in-flight."""

    def __init__(self, app: ASGIApp, replica: Replica) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        inference = scope["path"] in INFERENCE_PATHS
        tracing = self.replica.tracing if inference else None
        trace = None
        if inference:
            self.replica.enter()
        if tracing is not None:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            trace = tracing.begin(scope["method"], scope["path"], headers)

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            if tracing is not None and trace is not None:
                tracing.end(trace, status)
            if inference:
                self.replica.leave()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics = self.replica.metrics
            metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            metrics.request_latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)
