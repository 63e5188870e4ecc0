"""Issue 17 item 3: what the HTTP event loop spends per streamed token, side by side.

At 850M the server streams ~17,000 tokens/s (32 streams), and its TTFT p99 was 4.4x the static
batch's, 30-40 ms of it between the engine's first token and the client's (BENCHMARKS step 11).
Each token is one SSE event made and sent on the event loop. This probe runs a replica's
streaming route without a model, in a server process of its own: a thread stands in for the
engine and hands every open stream one token per step (``STEP_S``) in one call, as
``EventRelay`` does; clients in another process count the tokens they read. It reports, for each
variant, alternately: the server process's CPU time per token (the event loop's and the stand-in
thread's), and each token's delay from its hand-over to its event's turn in the stream (p50,
p99; a merged event's tokens each count).

* the chunk: ``model`` (a ``Completion`` serialized per token, as before ``TextEvents``),
  ``template`` (``metalserve.relay.TextEvents``) or ``template+merge`` (and a stream's queued
  text joined, ``generation.merge_text``: what the replica runs);
* ``http``: uvicorn's ``h11`` (the replica's before) or ``httptools`` (the replica's
  ``timed_http_protocol``);
* ``loop``: ``asyncio`` (the replica's before) or ``uvloop``.

``python bench/stream_path_probe.py OUT.json [ROUNDS] [STREAMS]`` (default 3 rounds, 32 streams).
"""

from __future__ import annotations

import asyncio
import collections
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STREAMS = 32
TOKENS = 1024  # per stream
STEP_S = 0.00116  # 850M's decode step at batch 32 on an H200 (BENCHMARKS step 11)
DEADLINE_S = 60.0  # a variant's whole run; the probe stops there
REQUEST = (
    b"POST /v1/completions HTTP/1.1\r\nhost: probe\r\ncontent-type: application/json\r\n"
    b"content-length: 2\r\n\r\n{}"
)
VARIANTS = ("model", "template", "template+merge")


def percentile(values: list[float], p: float) -> float:
    """Nearest rank, as bench serve's."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * p // 100) - 1)]


def serve(sock: socket.socket, variant: str, http: str, loop: str, report: Any) -> None:
    """The server process: the streams, and an engine stand-in that hands every open stream one
    token per step in one call, as ``EventRelay`` does."""
    import threading

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from metalserve.engine import TextDelta
    from metalserve.generation import merge_text, take_waiting
    from metalserve.http_protocol import timed_http_protocol
    from metalserve.relay import SSE_DONE, TextEvents, sse
    from metalserve.schemas import Completion, CompletionChoice, new_id, now

    app = FastAPI()
    # per stream: its queue (what Generation's holds) and when each queued token was handed over
    streams: list[tuple[asyncio.Queue[Any], collections.deque[float], list[int]]] = []
    delays: list[float] = []  # from each token's hand-over to its event's turn
    sent_events = [0]
    cpu: dict[str, float] = {}
    finished = 0

    def deliver(stamp: float) -> None:
        for queue, stamps, handed in streams:
            if handed[0] < TOKENS:
                handed[0] += 1
                stamps.append(stamp)
                queue.put_nowait((0, TextDelta(f" tok{handed[0] % 97}")))

    def engine(event_loop: asyncio.AbstractEventLoop) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while finished < STREAMS and time.monotonic() < deadline:
            event_loop.call_soon_threadsafe(deliver, time.perf_counter())
            time.sleep(STEP_S)

    @app.post("/v1/completions")
    async def completions() -> StreamingResponse:
        if not cpu:
            cpu["start"] = time.process_time()
            threading.Thread(target=engine, args=(asyncio.get_running_loop(),)).start()
        completion_id, created = new_id("cmpl"), now()

        def render(text: str) -> Completion:
            choice = CompletionChoice(index=0, text=text, finish_reason=None)
            return Completion(
                id=completion_id,
                created=created,
                model="probe",
                system_fingerprint="probe@0123456789ab",
                choices=[choice],
            )

        text_events = TextEvents(render)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stamps: collections.deque[float] = collections.deque()
        streams.append((queue, stamps, [0]))

        async def stream() -> Any:
            nonlocal finished
            sent = 0
            while sent < TOKENS:
                if variant == "template+merge":
                    waiting = merge_text(await take_waiting(queue))
                else:
                    waiting = [await queue.get()]
                for _, event in waiting:
                    sent_events[0] += 1
                    tokens = event.text.count("tok")
                    now = time.perf_counter()
                    for _ in range(tokens):  # a sample per token, merged or not
                        delays.append(now - stamps.popleft())
                    sent += tokens
                    yield text_events(event.text) if variant != "model" else sse(render(event.text))
            yield SSE_DONE
            finished += 1
            if finished == STREAMS:
                # a few numbers only: a larger message would fill the pipe and block the loop
                # before this stream's end reaches its client
                figures = (percentile(delays, 50), percentile(delays, 99))
                report.send((time.process_time() - cpu["start"], sent_events[0], *figures))

        return StreamingResponse(stream(), media_type="text/event-stream")

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        loop=loop,
        http=timed_http_protocol(60.0) if http == "httptools" else "h11",
    )
    uvicorn.Server(config).run(sockets=[sock])


async def client(port: int) -> int:
    """One stream, read to its end; returns the tokens counted (the body kept whole: ~200 kB)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    await writer.drain()
    body = bytearray()
    while not body.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's last chunk
        data = await reader.read(1 << 16)
        if not data:
            break
        body += data
    writer.close()
    return body.count(b"tok")


async def clients(port: int) -> tuple[float, int]:
    started = time.perf_counter()
    counts = await asyncio.wait_for(
        asyncio.gather(*(client(port) for _ in range(STREAMS))), DEADLINE_S
    )
    return time.perf_counter() - started, sum(counts)


def measure(variant: str, http: str, loop: str) -> dict[str, Any]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(STREAMS)
    port = sock.getsockname()[1]
    receive, report = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.get_context("fork").Process(
        target=serve, args=(sock, variant, http, loop, report), daemon=True
    )
    server.start()
    try:
        seconds, tokens = asyncio.run(clients(port))
        if not receive.poll(10):
            raise RuntimeError("the server did not report its CPU time")
        cpu, events, delay_p50, delay_p99 = receive.recv()
    finally:
        server.terminate()  # uvicorn's graceful stop
        server.join(10)
        if server.is_alive():
            server.kill()
            server.join(10)
        sock.close()
    if tokens != STREAMS * TOKENS:
        raise RuntimeError(f"{tokens} tokens arrived, not {STREAMS * TOKENS}")
    return {
        "seconds": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds),
        "events": events,
        "server_cpu_us_per_token": round(cpu / tokens * 1e6, 2),
        "delay_p50_ms": round(delay_p50 * 1e3, 3),
        "delay_p99_ms": round(delay_p99 * 1e3, 3),
    }


def variants() -> list[tuple[str, str, str]]:
    return [
        (v, h, lp) for h in ("h11", "httptools") for lp in ("asyncio", "uvloop") for v in VARIANTS
    ]


def main() -> None:
    out = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    global STREAMS
    STREAMS = int(sys.argv[3]) if len(sys.argv) > 3 else STREAMS
    runs = variants()
    samples: dict[str, list[dict[str, Any]]] = {"/".join(v): [] for v in runs}
    for _ in range(rounds):
        for variant in runs:
            result = measure(*variant)
            samples["/".join(variant)].append(result)
            print("/".join(variant), result, flush=True)
    keys = ("tokens_per_s", "events", "server_cpu_us_per_token", "delay_p50_ms", "delay_p99_ms")
    summary = {
        name: {key: statistics.median(r[key] for r in results) for key in keys}
        for name, results in samples.items()
    }
    before = summary["model/h11/asyncio"]
    for name, figures in summary.items():
        for key in ("server_cpu_us_per_token", "delay_p99_ms"):
            figures[f"{key}_vs_model_h11_asyncio"] = round(figures[key] / before[key], 3)
        print(name, figures)
    report = {
        "probe": "stream_path",
        "streams": STREAMS,
        "tokens_per_stream": TOKENS,
        "step_s": STEP_S,
        "rounds": rounds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "python": sys.version.split()[0],
        "summary": summary,
        "samples": samples,
    }
    Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
