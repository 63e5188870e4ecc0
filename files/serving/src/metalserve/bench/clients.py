"""``bench serve``'s HTTP clients: closed-loop streaming requests, spread over worker processes.

One Python process cannot both keep 32 streams fed and time them: at ~10,000 tokens/s every
streamed event costs the client's event loop tens of microseconds, so a single-process client
is itself the bottleneck and its lag lands in the TTFT it reports. ``drive`` therefore splits the
clients over ``processes`` spawned workers (each an asyncio loop of its share of the clients and
requests), starts them at one wall-clock instant and merges their samples.

Torch-free on purpose: a spawned worker imports this module, httpx and ``sse`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import httpx

from metalserve.bench import sse

REQUEST_TIMEOUT = 600.0
# Spawned workers import httpx and this package before they can start: they all begin at one
# instant this far ahead, so the arm's wall time starts together for every client.
START_DELAY_S = 3.0


class ClientError(Exception):
    """A request failed or generated the wrong number of tokens."""


@dataclass
class Samples:
    """What the clients measured: per request TTFT and latency, tokens, and the wall time."""

    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)


def drive(
    url: str,
    model: str,
    prompts: list[list[int]],
    total: int,
    clients: int,
    new_tokens: int,
    processes: int = 1,
) -> Samples:
    """``total`` streaming requests from ``clients`` concurrent clients (each sends its next
    request when its last one finished), over ``processes`` worker processes (1: this one)."""
    processes = max(1, min(processes, clients))
    if processes == 1:
        return asyncio.run(_drive(url, model, prompts, total, clients, new_tokens, None))
    at = time.time() + START_DELAY_S  # one start for all
    shares = [
        (share_of(clients, processes, i), share_of(total, processes, i)) for i in range(processes)
    ]
    # spawn, not fork: the bench process may hold CUDA state and threads.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        futures = [
            pool.submit(
                _drive_sync, url, model, prompts[i::processes] or prompts, n, c, new_tokens, at
            )
            for i, (c, n) in enumerate(shares)
            if c and n
        ]
        parts = [f.result() for f in futures]
    merged = Samples()
    for part in parts:
        merged.requests += part.requests
        merged.tokens += part.tokens
        merged.seconds = max(merged.seconds, part.seconds)
        merged.ttft += part.ttft
        merged.latency += part.latency
    return merged


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
    start_at: float,
) -> Samples:
    return asyncio.run(_drive(url, model, prompts, total, clients, new_tokens, start_at))


async def _drive(
    url: str,
    model: str,
    prompts: list[list[int]],
    total: int,
    clients: int,
    new_tokens: int,
    start_at: float | None,
) -> Samples:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    indices = iter(range(total))
    samples = Samples()
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, limits=limits) as client:

        async def one_client() -> None:
            for index in indices:  # shared: each request is taken by exactly one client
                prompt = prompts[index % len(prompts)]
                ttft, latency, tokens = await _request(client, model, prompt, new_tokens)
                samples.ttft.append(ttft)
                samples.latency.append(latency)
                samples.tokens += tokens
                samples.requests += 1

        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.time()))
        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        samples.seconds = time.perf_counter() - started
    return samples


async def _request(
    client: httpx.AsyncClient, model: str, prompt: list[int], new_tokens: int
) -> tuple[float, float, int]:
    """One greedy streaming completion of exactly ``new_tokens``: (TTFT, latency, tokens)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    try:
        async with contextlib.aclosing(sse.events(client, "/v1/completions", body)) as stream:
            async for chunk in stream:
                if ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
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
    return (latency if ttft is None else ttft), latency, tokens
