"""OpenTelemetry spans of a replica's inference requests (``--otlp-endpoint``).

Off by default, and free when off: nothing of the SDK is imported and no span is made. When on,
each inference request gets a server span that continues the caller's W3C ``traceparent`` (the
load balancer's or the client's), with one child span per phase of each of its sequences:

* ``queue``: submitted to the engine until admitted to the batch;
* ``prefill``: admitted until its first token;
* ``decode``: first token until its last;
* ``relay``: the request's last token until its last byte was sent.

The engine thread only stamps times on its sequences (``Sequence.admitted_at`` and so on); the
spans are made on the event loop once the request ends, so the tracer never runs in the engine's
loop. Spans leave through a batch processor to the OTLP/HTTP endpoint.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metalserve.engine import Sequence

# The sequences of the request being handled (set by the middleware, filled by Generation).
_REQUEST_SEQUENCES: contextvars.ContextVar[list[Sequence] | None] = contextvars.ContextVar(
    "metalserve_request_sequences", default=None
)


def note_sequences(seqs: Iterable[Sequence]) -> None:
    """Attach a request's sequences to its span (no-op unless a traced request is running)."""
    traced = _REQUEST_SEQUENCES.get()
    if traced is not None:
        traced.extend(seqs)


@dataclass
class RequestTrace:
    """One inference request being traced: its server span and its sequences."""

    span: Any
    sequences: list[Sequence] = field(default_factory=list)
    token: contextvars.Token[list[Sequence] | None] | None = None


class Tracing:
    """The replica's tracer and its provider (``flush`` and ``shutdown`` on exit)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        self.provider = provider
        self.tracer = provider.get_tracer("metalserve")
        self._extract = extract
        self._server = SpanKind.SERVER

    @classmethod
    def otlp(cls, endpoint: str, attributes: dict[str, str]) -> Tracing:
        """Spans to an OTLP/HTTP collector at ``endpoint`` (e.g. http://collector:4318)."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(
            resource=Resource.create({"service.name": "metalserve", **attributes})
        )
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def begin(self, method: str, path: str, headers: dict[str, str]) -> RequestTrace:
        """Start a request's server span under the caller's ``traceparent``, if any."""
        span = self.tracer.start_span(
            f"{method} {path}",
            context=self._extract(headers),
            kind=self._server,
            attributes={"http.request.method": method, "url.path": path},
        )
        trace = RequestTrace(span)
        trace.token = _REQUEST_SEQUENCES.set(trace.sequences)
        return trace

    def end(self, trace: RequestTrace, status: int) -> None:
        """Make the phase spans of the request's sequences, then end its span."""
        from opentelemetry.trace import set_span_in_context

        if trace.token is not None:
            _REQUEST_SEQUENCES.reset(trace.token)
        ended = time.time_ns()
        # The engine stamps monotonic times: shift them onto the wall clock once.
        shift = ended - time.monotonic_ns()
        parent = set_span_in_context(trace.span)
        last_token = None
        for index, seq in enumerate(trace.sequences):
            stamps = [seq.created_at, seq.admitted_at, seq.first_token_at, seq.finished_at]
            for name, start, stop in zip(
                ("queue", "prefill", "decode"), stamps, stamps[1:], strict=False
            ):
                if start is None or stop is None:
                    break
                span = self.tracer.start_span(
                    name,
                    context=parent,
                    start_time=int(start * 1e9) + shift,
                    attributes={"metalserve.sequence": index},
                )
                span.end(end_time=int(stop * 1e9) + shift)
            if seq.finished_at is not None:
                last_token = max(last_token or 0.0, seq.finished_at)
        if last_token is not None:
            relay = self.tracer.start_span(
                "relay", context=parent, start_time=int(last_token * 1e9) + shift
            )
            relay.end(end_time=ended)
        trace.span.set_attribute("http.response.status_code", status)
        if trace.sequences:
            first = trace.sequences[0]
            trace.span.set_attribute("metalserve.model", first.bundle.name)
            trace.span.set_attribute("metalserve.version", first.bundle.version_id)
            trace.span.set_attribute(
                "metalserve.completion_tokens", sum(len(s.generated) for s in trace.sequences)
            )
        if status >= 500:
            from opentelemetry.trace import Status, StatusCode

            trace.span.set_status(Status(StatusCode.ERROR))
        trace.span.end(end_time=ended)

    def shutdown(self) -> None:
        self.provider.shutdown()
