"""``metalserve load``: a bounded load generator for an OpenAI-compatible ``/v1/completions``.

Run against HAProxy during a rolling update to show that no client request failed. Every run is
bounded: it stops after ``duration`` seconds or ``max_requests`` requests, whichever comes first,
and earlier on SIGTERM/SIGINT or once the stop file exists. Requests in flight at that moment
are finished (each is bounded by ``timeout``) and counted.

Only the standard library, pydantic-settings and httpx are imported here, so the command runs on
hosts without torch, transformers or FastAPI. Its settings are ``options.LoadSettings``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import signal
import ssl
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from metalserve.bench import sse
from metalserve.bench.common import percentile
from metalserve.bench.options import LoadSettings

MODELS_PATH = "/v1/models"
COMPLETIONS_PATH = "/v1/completions"
SAMPLED_TEMPERATURE = 0.8
SAMPLED_TOP_P = 0.95
FAILURE_PAUSE_S = 0.1  # after a failed request, so that an outage does not become a busy loop
ERROR_CHARS = 120
MAX_EXAMPLES = 5

StopReason = Literal["duration", "max_requests", "signal", "stop_file"]


class LoadError(Exception):
    """The run could not start (for example: the model id could not be read)."""


@dataclass(frozen=True, slots=True)
class RequestResult:
    index: int
    stream: bool
    ok: bool
    latency_s: float  # from sending the request to its last byte
    reason: str | None = None  # short, for counting; None when ok
    detail: str | None = None  # longer, for failure_examples
    fingerprint: str | None = None
    done_s: float = 0.0  # from the run's start to the request's end


@dataclass(slots=True)
class _Run:
    settings: LoadSettings
    model: str
    started: float
    results: list[RequestResult] = field(default_factory=list)
    next_index: int = 0
    stopped_by: StopReason | None = None

    def stop(self, reason: StopReason) -> None:
        if self.stopped_by is None:  # the first reason wins
            self.stopped_by = reason

    def take_index(self) -> int | None:
        """The next request's index, or None once the run has to stop (checked between requests)."""
        settings = self.settings
        if self.stopped_by is None:
            if self.next_index >= settings.max_requests:
                self.stop("max_requests")
            elif time.monotonic() - self.started >= settings.duration:
                self.stop("duration")
            elif settings.stop_file is not None and settings.stop_file.exists():
                self.stop("stop_file")
        if self.stopped_by is not None:
            return None
        index = self.next_index
        self.next_index += 1
        return index


# --- request plan (deterministic per request index) -----------------------------------------


def is_streaming(index: int, ratio: float) -> bool:
    """Spread streaming requests evenly: after n requests, floor(n * ratio) of them streamed."""
    return math.floor((index + 1) * ratio) > math.floor(index * ratio)


def is_greedy(index: int) -> bool:
    """Pairs alternate: greedy, greedy, sampled, sampled, ... With --stream-ratio 0.5 every
    group of four requests covers streamed/not x greedy/sampled."""
    return (index // 2) % 2 == 0


def request_body(index: int, settings: LoadSettings, model: str) -> dict[str, Any]:
    # Each prompt is used for four consecutive requests (the group above), then the next one.
    prompt = settings.prompts[(index // 4) % len(settings.prompts)]
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": settings.max_tokens,
        "stream": is_streaming(index, settings.stream_ratio),
    }
    if is_greedy(index):
        body["temperature"] = 0
    else:
        body.update(temperature=SAMPLED_TEMPERATURE, top_p=SAMPLED_TOP_P, seed=index)
    return body


# --- one request (failures raise sse.StreamError: reason for counting, detail for examples) --


def _error_message(payload: object) -> str | None:
    """The ``error.message`` of an OpenAI-style error object, if there is one (shortened)."""
    message = sse.error_message(payload)
    return None if message is None else message[:ERROR_CHARS]


def _http_failure(status: int, body: bytes) -> sse.StreamError:
    try:
        message = _error_message(json.loads(body))
    except ValueError:
        message = None
    reason = f"http {status}" + (f": {message}" if message else "")
    return sse.StreamError(reason, reason if message else f"{reason}: {body[:ERROR_CHARS]!r}")


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _fingerprint(payload: dict[str, Any]) -> str | None:
    value = payload.get("system_fingerprint")
    return value if isinstance(value, str) else None


async def _complete(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> str | None:
    response = await client.post(url, json=body)
    if response.status_code != 200:
        raise _http_failure(response.status_code, response.content)
    try:
        payload = response.json()
        text = payload["choices"][0]["text"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise sse.StreamError(
            "malformed body", f"malformed body: {response.content[:200]!r}"
        ) from exc
    if not isinstance(text, str):
        raise sse.StreamError("malformed body", "malformed body: choices[0].text is not a string")
    return _fingerprint(payload)


async def _complete_streaming(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> str | None:
    fingerprint = None
    try:
        async with contextlib.aclosing(
            sse.events(client, url, body, read_past_done=True)
        ) as stream:
            async for event in stream:
                fingerprint = fingerprint or _fingerprint(event)
    except sse.HTTPStatusError as exc:
        raise _http_failure(exc.status, exc.body) from None
    except sse.ErrorEvent as exc:
        raise sse.StreamError(f"stream error: {exc.message[:ERROR_CHARS]}") from None
    return fingerprint


async def send_one(
    client: httpx.AsyncClient, settings: LoadSettings, model: str, index: int
) -> RequestResult:
    body = request_body(index, settings, model)
    stream = bool(body["stream"])
    url = settings.base_url + COMPLETIONS_PATH
    started = time.monotonic()
    try:
        # httpx's timeout bounds each phase (connect, each read); this bounds the whole request.
        async with asyncio.timeout(settings.timeout):
            if stream:
                fingerprint = await _complete_streaming(client, url, body)
            else:
                fingerprint = await _complete(client, url, body)
    except sse.StreamError as exc:
        reason, detail = exc.reason, exc.detail
    except httpx.HTTPError as exc:  # transport errors and httpx's own timeouts
        reason, detail = type(exc).__name__, _describe(exc)
    except TimeoutError:
        reason = detail = f"timeout after {settings.timeout:g}s"
    else:
        latency = time.monotonic() - started
        return RequestResult(index, stream, True, latency, fingerprint=fingerprint)
    latency = time.monotonic() - started
    kind = "stream" if stream else "non-stream"
    return RequestResult(index, stream, False, latency, reason, f"#{index} {kind}: {detail}")


# --- the run --------------------------------------------------------------------------------


def _client(settings: LoadSettings) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = True
    if settings.insecure:
        verify = False
    elif settings.cacert is not None:
        verify = ssl.create_default_context(cafile=str(settings.cacert))
    headers = settings.header_dict()
    limits = httpx.Limits(
        max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
    )
    return httpx.AsyncClient(
        headers=headers, verify=verify, timeout=settings.timeout, limits=limits
    )


async def fetch_model(client: httpx.AsyncClient, settings: LoadSettings) -> str:
    """The first model id of ``GET URL/v1/models``."""
    url = settings.base_url + MODELS_PATH
    try:
        response = await client.get(url)
        response.raise_for_status()
        model = response.json()["data"][0]["id"]
    except httpx.HTTPError as exc:
        raise LoadError(f"cannot read the model id from {url}: {_describe(exc)}") from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise LoadError(f"cannot read the model id from {url}: unexpected answer") from exc
    if not isinstance(model, str) or not model:
        raise LoadError(f"cannot read the model id from {url}: unexpected answer")
    return model


async def _worker(client: httpx.AsyncClient, run: _Run) -> None:
    rate = run.settings.rate
    while (index := run.take_index()) is not None:
        if rate > 0:
            # Request i is due i/rate seconds after the start (a steady pace that leaves the
            # cluster CPU to spare); a worker that is late sends at once.
            await asyncio.sleep(max(0.0, run.started + index / rate - time.monotonic()))
        result = await send_one(client, run.settings, run.model, index)
        run.results.append(dataclasses.replace(result, done_s=time.monotonic() - run.started))
        if not result.ok:
            await asyncio.sleep(FAILURE_PAUSE_S)


async def _progress(run: _Run) -> None:
    while True:
        await asyncio.sleep(run.settings.progress_interval)
        failed = sum(not r.ok for r in run.results)
        print(
            f"load: {time.monotonic() - run.started:.0f}s sent={run.next_index} "
            f"done={len(run.results)} failed={failed}",
            file=sys.stderr,
            flush=True,
        )


async def run_load(settings: LoadSettings, *, handle_signals: bool = True) -> dict[str, Any]:
    """Run the load and return the summary (see :func:`summarize`).

    With ``handle_signals``, the first SIGTERM or SIGINT stops the run (in-flight requests still
    finish); the handlers are then removed, so a second signal acts as usual and kills it.
    Raises ValueError on invalid settings and LoadError when the model id cannot be read.
    """
    problems = settings.problems()
    if problems:
        raise ValueError("; ".join(problems))
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    run: _Run | None = None
    interrupted = False

    def on_signal() -> None:
        nonlocal interrupted
        interrupted = True
        if run is not None:
            run.stop("signal")
        for signum in installed:
            loop.remove_signal_handler(signum)
        installed.clear()

    try:
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, on_signal)
                installed.append(signum)
        async with _client(settings) as client:
            model = settings.model or await fetch_model(client, settings)
            run = _Run(settings, model, time.monotonic())
            if interrupted:
                run.stop("signal")
            print(
                f"load: {settings.base_url} model={model} concurrency={settings.concurrency} "
                f"duration={settings.duration:g}s max_requests={settings.max_requests}",
                file=sys.stderr,
                flush=True,
            )
            progress = asyncio.create_task(_progress(run))
            try:
                await asyncio.gather(*(_worker(client, run) for _ in range(settings.concurrency)))
            finally:
                progress.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
    assert run is not None  # set before the workers start; fetch_model() raises otherwise
    elapsed = time.monotonic() - run.started
    # take_index() always sets stopped_by before the last worker returns.
    return summarize(settings.base_url, model, elapsed, run.results, run.stopped_by or "duration")


# --- summary (pure) -------------------------------------------------------------------------


def summarize(
    url: str,
    model: str,
    duration_s: float,
    results: Sequence[RequestResult],
    stopped_by: StopReason,
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    latencies = sorted(r.latency_s * 1000 for r in ok)
    latency_ms: dict[str, float | None] = {"p50": None, "p99": None, "max": None}
    if latencies:
        latency_ms = {
            "p50": round(percentile(latencies, 50), 1),
            "p99": round(percentile(latencies, 99), 1),
            "max": round(latencies[-1], 1),
        }
    streaming = sum(r.stream for r in results)
    # What a client saw of an outage (a load balancer's failover, say): the longest stretch of
    # the run in which no request succeeded.
    edges = [0.0, *sorted(r.done_s for r in ok), max(duration_s, 0.0)]
    longest_gap = max(later - earlier for earlier, later in itertools.pairwise(edges))
    return {
        "url": url,
        "model": model,
        "duration_s": round(duration_s, 3),
        "sent": len(results),
        "ok": len(ok),
        "failed": len(failed),
        "streaming": streaming,
        "non_streaming": len(results) - streaming,
        "requests_per_s": round(len(results) / duration_s, 2) if duration_s > 0 else 0.0,
        "latency_ms": latency_ms,
        "longest_gap_s": round(longest_gap, 3),
        "failures": dict(Counter(r.reason or "?" for r in failed).most_common()),
        "failure_examples": [r.detail or r.reason or "?" for r in failed[:MAX_EXAMPLES]],
        # Over successful requests: which versions answered.
        "fingerprints": dict(Counter(r.fingerprint or "none" for r in ok).most_common()),
        "stopped_by": stopped_by,
    }


def exit_code(summary: dict[str, Any]) -> int:
    """0 when requests were sent and none failed, else 1."""
    return 0 if summary["failed"] == 0 and summary["sent"] > 0 else 1
