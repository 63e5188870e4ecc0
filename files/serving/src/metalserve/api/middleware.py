"""Request metrics (a streamed completion's time to its first event too), the in-flight
count that the drain waits on, request spans (tracing), the request id (``X-Request-Id``:
HAProxy's, else made here; in every log line written for the request and in the response) and
one access line per request.

Pure ASGI, not ``BaseHTTPMiddleware``: streamed responses are timed to their last byte.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metalserve.http_protocol import RECEIVED
from metalserve.logs import REQUEST_ID, request_id_from
from metalserve.replica import Replica

access_log = logging.getLogger("metalserve.access")

INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
FIRST_EVENT_TIMED = "/v1/completions"
SSE = b"text/event-stream"


class ObservabilityMiddleware:
    """Counts requests by route and status, times them to the last byte, tracks in-flight."""

    def __init__(self, app: ASGIApp, replica: Replica) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        begun = time.perf_counter()
        # From the request's arrival, where the protocol stamped it (not under a test client):
        # in a wave of requests the later ones wait for the loop to get to them.
        started = scope.get(RECEIVED, begun)
        self.replica.metrics.request_start_delay.observe(begun - started)
        status = 500
        given = dict(scope["headers"]).get(b"x-request-id")
        request_id = request_id_from(given.decode("latin-1") if given is not None else None)
        context = REQUEST_ID.set(request_id)
        inference = scope["path"] in INFERENCE_PATHS
        tracing = self.replica.tracing if inference else None
        trace = None
        if inference:
            self.replica.enter()
        if tracing is not None:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            trace = tracing.begin(scope["method"], scope["path"], headers)

        # Timed: a streamed completion's first event, which carries its first token (a chat
        # stream's first event announces the role before any token; an answer not streamed
        # comes whole at the end).
        timing_first_event = False

        async def send_and_record(message: Message) -> None:
            nonlocal status, timing_first_event
            if message["type"] == "http.response.start":
                status = message["status"]
                id_header = (b"x-request-id", request_id.encode())
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
                timing_first_event = (
                    scope["path"] == FIRST_EVENT_TIMED
                    and status == 200
                    and (b"content-type", SSE)
                    in ((name.lower(), value.split(b";")[0]) for name, value in message["headers"])
                )
            elif timing_first_event and message.get("body"):
                timing_first_event = False
                self.replica.metrics.time_to_first_byte.labels(endpoint="completions").observe(
                    time.perf_counter() - started
                )
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
            seconds = time.perf_counter() - started
            metrics.request_latency.labels(endpoint=endpoint).observe(seconds)
            if self.replica.settings.access_log:
                self._log_access(scope, status, seconds, self.replica.api_process)
            REQUEST_ID.reset(context)

    @staticmethod
    def _log_access(scope: Scope, status: int, seconds: float, api_process: int | None) -> None:
        client = scope.get("client")
        fields = {
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_s": round(seconds, 4),
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        line, args = "%s %s %d %.3fs", [scope["method"], scope["path"], status, seconds]
        if api_process is not None:
            fields["api_process"] = api_process
            line += " api_process=%d"
            args.append(api_process)
        access_log.info(line, *args, extra=fields)
