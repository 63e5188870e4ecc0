"""``bench serve``'s HTTP clients: closed-loop streaming requests, spread over worker processes.

One Python process cannot both keep 32 streams fed and time them: at ~10,000 tokens/s every
streamed event costs the client's event loop tens of microseconds, so a single-process client
is itself the bottleneck and its lag lands in the TTFT it reports. ``drive`` therefore splits the
clients over ``processes`` spawned workers (each an asyncio loop of its share of the clients and
requests), warms every client's connection up, starts the timed part of all of them together and
merges their samples.

Torch-free on purpose: a spawned worker imports this module, httpx and ``sse`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import httpx

from metalserve.bench import sse

REQUEST_TIMEOUT = 600.0
# How long a worker waits for the others to finish their warm-up before the timed part.
BARRIER_TIMEOUT_S = 600.0


class ClientError(Exception):
    """A request failed or generated the wrong number of tokens."""


@dataclass
class Samples:
    """What the clients measured: per request TTFT and latency, tokens, and the wall time."""

    requests: int = 0
    tokens: int = 0
    # Streamed events that carried text: fewer than tokens when the server merged a stream's
    # queued tokens into one event (its event loop fell behind).
    text_events: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    # Per request: its response's head, which the server sends once the request is tokenized
    # and with the engine (its first event follows with the first token): TTFT minus this is
    # the first token's part, this the request's way in.
    head: list[float] = field(default_factory=list)
    # Each client process's CPU seconds over the timed part: near its wall time, the clients'
    # own work (parsing events, sending requests) delays what they measure.
    cpu_seconds: list[float] = field(default_factory=list)


def drive(
    url: str,
    model: str,
    prompts: list[list[int]],
    total: int,
    clients: int,
    new_tokens: int,
    processes: int = 1,
    warmed_up: Callable[[], object] = lambda: None,
    sampling: dict[str, float] | None = None,
) -> Samples:
    """``total`` streaming requests from ``clients`` concurrent clients (each sends its next
    request when its last one finished), over ``processes`` worker processes (1: this one);
    ``sampling``: the requests' temperature and top_p (default: greedy).

    Each client first sends one untimed request on its own connection (a process's first
    request pays its connection and lazy imports: ~0.2 s, which would be 1 in 32 samples). Once
    every client has, ``warmed_up`` runs (e.g. a scrape of the server's counters), then the timed
    part starts in every process at once."""
    processes = max(1, min(processes, clients))
    sampling = sampling or {"temperature": 0.0}
    if processes == 1:
        return asyncio.run(
            _drive(url, model, prompts, total, clients, new_tokens, sampling, Gate(None, warmed_up))
        )
    shares = [
        (share_of(clients, processes, i), share_of(total, processes, i)) for i in range(processes)
    ]
    work = [(i, c, n) for i, (c, n) in enumerate(shares) if c and n]
    # spawn, not fork: the bench process may hold CUDA state and threads.
    context = multiprocessing.get_context("spawn")
    with (
        context.Manager() as manager,
        ProcessPoolExecutor(max_workers=len(work), mp_context=context) as pool,
    ):
        # The workers and this process: all warmed up; then all go.
        barriers = (manager.Barrier(len(work) + 1), manager.Barrier(len(work) + 1))
        gate = Gate(barriers, None)
        futures = [
            pool.submit(
                _drive_sync,
                url,
                model,
                prompts[i::processes] or prompts,
                n,
                c,
                new_tokens,
                sampling,
                gate,
            )
            for i, c, n in work
        ]
        threading.Thread(target=_abort_on_failure, args=(futures, gate), daemon=True).start()
        try:
            barriers[0].wait(BARRIER_TIMEOUT_S)
            warmed_up()
            barriers[1].wait(BARRIER_TIMEOUT_S)
        except threading.BrokenBarrierError:
            pass  # a worker failed: its exception comes from its future
        parts = [f.result() for f in futures]
    merged = Samples()
    for part in parts:
        merged.requests += part.requests
        merged.tokens += part.tokens
        merged.text_events += part.text_events
        merged.seconds = max(merged.seconds, part.seconds)
        merged.ttft += part.ttft
        merged.latency += part.latency
        merged.head += part.head
        merged.cpu_seconds += part.cpu_seconds
    return merged


@dataclass(frozen=True)
class Gate:
    """Between the warm-up and the timed part: in a worker, two barriers shared with the other
    workers and the parent (all warmed up; all go); in a single process, a callback."""

    barriers: tuple[Any, Any] | None
    warmed_up: Callable[[], object] | None

    def pass_through(self) -> None:
        if self.barriers is None:
            if self.warmed_up is not None:
                self.warmed_up()
            return
        for barrier in self.barriers:
            barrier.wait(BARRIER_TIMEOUT_S)

    def abort(self) -> None:
        for barrier in self.barriers or ():
            barrier.abort()


def _abort_on_failure(futures: list[Future[Samples]], gate: Gate) -> None:
    """A worker that dies before the barriers (e.g. at start-up) releases everyone waiting."""
    for future in as_completed(futures):
        if future.exception() is not None:
            gate.abort()
            return


def share_of(count: int, parts: int, index: int) -> int:
    """Part ``index`` of ``count`` split into ``parts`` nearly equal parts (they sum to it)."""
    return count // parts + (1 if index < count % parts else 0)


def _drive_sync(
    url: str,
    model: str,
    prompts: list[list[int]],
    total: int,
    clients: int,
    new_tokens: int,
    sampling: dict[str, float],
    gate: Gate,
) -> Samples:
    return asyncio.run(_drive(url, model, prompts, total, clients, new_tokens, sampling, gate))


async def _drive(
    url: str,
    model: str,
    prompts: list[list[int]],
    total: int,
    clients: int,
    new_tokens: int,
    sampling: dict[str, float],
    gate: Gate,
) -> Samples:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    indices = iter(range(total))
    samples = Samples()
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, limits=limits) as client:

        async def one_client() -> None:
            for index in indices:  # shared: each request is taken by exactly one client
                prompt = prompts[index % len(prompts)]
                ttft, latency, head, tokens, text_events = await _request(
                    client, model, prompt, new_tokens, sampling
                )
                samples.ttft.append(ttft)
                samples.latency.append(latency)
                samples.head.append(head)
                samples.tokens += tokens
                samples.text_events += text_events
                samples.requests += 1

        # The untimed warm-up: one request per client, each on its own connection.
        warm_up = (prompts[i % len(prompts)] for i in range(clients))
        try:
            await asyncio.gather(
                *(_request(client, model, p, new_tokens, sampling) for p in warm_up)
            )
        except BaseException:
            gate.abort()  # the other processes stop waiting for this one
            raise
        await asyncio.to_thread(gate.pass_through)
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        samples.seconds = time.perf_counter() - started
        samples.cpu_seconds = [time.process_time() - cpu]
    return samples


async def _request(
    client: httpx.AsyncClient,
    model: str,
    prompt: list[int],
    new_tokens: int,
    sampling: dict[str, float],
) -> tuple[float, float, float, int, int]:
    """One streaming completion of exactly ``new_tokens`` (``sampling``: its temperature and
    top_p): (TTFT, latency, response head, tokens, events with text)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": new_tokens,
        **sampling,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    ttft: float | None = None
    head = 0.0
    tokens = text_events = 0

    def head_in() -> None:
        nonlocal head
        head = time.perf_counter() - sent

    try:
        stream_events = sse.events(client, "/v1/completions", body, on_head=head_in)
        async with contextlib.aclosing(stream_events) as stream:
            async for chunk in stream:
                if any(c.get("text") for c in chunk.get("choices", [])):
                    text_events += 1
                    if ttft is None:
                        ttft = time.perf_counter() - sent
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
    except sse.HTTPStatusError as exc:
        raise ClientError(f"HTTP {exc.status}: {exc.body[:500]!r}") from None
    except sse.ErrorEvent as exc:
        raise ClientError(f"the server failed a request: {exc.error}") from None
    except sse.StreamError as exc:
        raise ClientError(f"a request's stream failed: {exc.detail}") from None
    latency = time.perf_counter() - sent
    if tokens != new_tokens:
        raise ClientError(f"a request generated {tokens} tokens, not {new_tokens}")
    return (latency if ttft is None else ttft), latency, head, tokens, text_events
