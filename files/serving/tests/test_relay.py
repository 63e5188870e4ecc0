"""The hand-over of engine events to the event loop, and their framing as server-sent events."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metalserve.engine import Event, Failed, Finished, TextDelta
from metalserve.generation import merge_text, take_waiting
from metalserve.relay import SSE_DONE, EventRelay, TextEvents, _deliver, sse, stream_failure
from metalserve.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    Usage,
)


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


# Texts a tokenizer may hand out: any characters, those JSON escapes among them.
TEXTS = st.text() | st.sampled_from(["", '"', "\\", "\n\t", "\x00\x1f", "é😀", "\u2028", "\ud7ff"])


def completion_chunk(text: str) -> Completion:
    choice = CompletionChoice(index=2, text=text, finish_reason=None)
    return Completion(id="cmpl-1", created=7, model="m", system_fingerprint="m@1", choices=[choice])


def chat_chunk(text: str) -> ChatCompletionChunk:
    choice = ChatChunkChoice(index=0, delta=ChatDelta(content=text))
    return ChatCompletionChunk(
        id="chatcmpl-1", created=7, model="m", system_fingerprint="m@1", choices=[choice]
    )


@given(text=TEXTS)
def test_text_events_are_the_models_own_bytes(text: str) -> None:
    for render in (completion_chunk, chat_chunk):
        assert TextEvents(render)(text) == sse(render(text)).encode()


def test_text_events_refuse_a_chunk_with_the_marker_elsewhere() -> None:
    def named_after_its_text(text: str) -> Completion:
        return completion_chunk(text).model_copy(update={"model": text})

    with pytest.raises(ValueError, match="marker"):
        TextEvents(named_after_its_text)


def test_waiting_text_is_merged_per_sequence_in_order() -> None:
    done = Finished("length", 3, 4)
    failed = Failed(500, "gone")
    events: list[tuple[int, Event]] = [
        (0, TextDelta("a")),
        (1, TextDelta("b")),
        (0, TextDelta("c")),
        (0, done),
        (1, TextDelta("d")),
        (2, TextDelta("e")),
        (2, failed),
    ]
    assert merge_text(events) == [
        (0, TextDelta("ac")),
        (1, TextDelta("bd")),
        (0, done),
        (2, TextDelta("e")),
        (2, failed),
    ]
    assert merge_text([]) == []


@given(
    st.lists(st.tuples(st.integers(0, 2), st.one_of(st.builds(TextDelta, TEXTS), st.just(None))))
)
def test_merging_keeps_each_sequences_text_and_its_ends(raw: list[tuple[int, Any]]) -> None:
    events: list[tuple[int, Event]] = [
        (index, event if event is not None else Finished("stop", 1, 1)) for index, event in raw
    ]
    merged = merge_text(events)

    def per_sequence(items: list[tuple[int, Event]], index: int) -> list[str | Event]:
        """A sequence's texts joined between its other events, and those events."""
        out: list[str | Event] = []
        for i, event in items:
            if i != index:
                continue
            if isinstance(event, TextDelta):
                if out and isinstance(out[-1], str):
                    out[-1] += event.text
                    continue
                out.append(event.text)
            else:
                out.append(event)
        return out

    for index in range(3):
        assert per_sequence(merged, index) == per_sequence(events, index)
        # and no two texts of a sequence follow each other: each run is one event
        mine = [e for i, e in merged if i == index]
        assert not any(
            isinstance(a, TextDelta) and isinstance(b, TextDelta)
            for a, b in itertools.pairwise(mine)
        )


def test_take_waiting_takes_what_is_queued() -> None:
    async def main() -> tuple[list[tuple[int, Event]], list[tuple[int, Event]]]:
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        for text in "xyz":
            queue.put_nowait((0, TextDelta(text)))
        first = await take_waiting(queue)
        later = asyncio.get_running_loop().call_later(0.05, queue.put_nowait, (1, TextDelta("w")))
        second = await take_waiting(queue)  # waits for the next item
        later.cancel()
        return first, second

    first, second = asyncio.run(main())
    assert first == [(0, TextDelta("x")), (0, TextDelta("y")), (0, TextDelta("z"))]
    assert second == [(1, TextDelta("w"))]
