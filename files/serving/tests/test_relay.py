"""The hand-over of engine events to the event loop, and their framing as server-sent events."""

from __future__ import annotations

import asyncio
import json

from metalserve.engine import Failed
from metalserve.relay import SSE_DONE, EventRelay, _deliver, sse, stream_failure
from metalserve.schemas import Usage


def test_event_relay_hands_over_once_per_flush() -> None:
    async def main() -> list[tuple[int, str]]:
        loop = asyncio.get_running_loop()
        relay = EventRelay()
        calls = 0
        original = loop.call_soon_threadsafe

        def counting(*args: object) -> object:
            nonlocal calls
            calls += args[0] is _deliver  # to_thread hands its result over this way too
            return original(*args)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        queues: list[asyncio.Queue[tuple[int, str]]] = [asyncio.Queue() for _ in range(3)]
        for step in range(2):
            for index, queue in enumerate(queues):
                relay.push(loop, queue, (index, f"token{step}"))
            await asyncio.to_thread(relay.flush)  # the engine thread flushes
        relay.flush()  # nothing pending: no hand-off
        await asyncio.sleep(0)
        assert calls == 2
        return [queues[1].get_nowait(), queues[1].get_nowait()]

    assert asyncio.run(main()) == [(1, "token0"), (1, "token1")]


def test_a_flush_to_a_closed_loop_is_dropped() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    relay = EventRelay()
    relay.push(loop, asyncio.Queue(), "lost")
    relay.flush()  # nobody listens any more: no error


def test_sse_framing() -> None:
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n'
    model = sse(Usage.of(3, 4))
    assert model.startswith("data: {")
    assert model.endswith("}\n\n")
    assert json.loads(model.removeprefix("data: ")) == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    assert SSE_DONE == "data: [DONE]\n\n"


def test_stream_failure_is_an_openai_error_event() -> None:
    event = stream_failure(Failed(500, "the device is gone"))
    assert json.loads(event.removeprefix("data: ")) == {
        "error": {
            "message": "the device is gone",
            "type": "server_error",
            "param": None,
            "code": "generation_failed",
        }
    }
