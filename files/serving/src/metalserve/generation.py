"""One request's generation: its sequences in the engine and their events on the event loop.

Whatever way the request ends (done, failed, client gone), its sequences are cancelled, so the
engine never generates for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request

from metalserve.engine import (
    Event,
    Failed,
    Finished,
    QueueFullError,
    Sequence,
    StaleModelError,
    TextDelta,
)
from metalserve.errors import ApiError
from metalserve.loader import ModelView
from metalserve.prompts import sampling_params, tokenized_inline
from metalserve.replica import Replica
from metalserve.sampling import SamplingParams, TokenLogprob
from metalserve.schemas import ChatCompletionRequest, CompletionRequest
from metalserve.tracing import note_sequences

# How often a non-streaming request checks whether its client is still connected.
DISCONNECT_POLL_SECONDS = 1.0
# Reloads that may swap the model while one request is prepared before it gives up.
PREPARE_ATTEMPTS = 3


@dataclass
class Choice:
    """One sequence's output, collected for a non-streaming response."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[tuple[int, TokenLogprob], ...] | None = None


class Generation:
    """The sequences of one request and their events, handed over to the event loop."""

    def __init__(
        self,
        replica: Replica,
        bundle: ModelView,
        prompts: list[list[int]],
        params: SamplingParams,
        endpoint: str,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._relay = replica.relay
        self._engine = replica.engine
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.bundle = bundle
        self.seqs = [
            Sequence(
                bundle=bundle,
                prompt_ids=ids,
                params=params,
                sink=self._sink(i),
                endpoint=endpoint,
            )
            for i, ids in enumerate(prompts)
        ]
        note_sequences(self.seqs)
        try:
            for seq in self.seqs:
                replica.engine.submit(seq)
        except QueueFullError as exc:
            self.cancel()
            raise ApiError(429, f"the server is overloaded: {exc}", code="queue_full") from exc
        except StaleModelError:
            self.cancel()
            raise
        except RuntimeError as exc:
            self.cancel()
            raise ApiError(503, str(exc), code="engine_stopped") from exc

    def _sink(self, index: int) -> Callable[[Event], None]:
        def push(event: Event) -> None:
            self._relay.push(self._loop, self.queue, (index, event))

        return push

    def cancel(self) -> None:
        for seq in self.seqs:
            self._engine.cancel(seq)

    @property
    def fingerprint(self) -> str:
        return f"{self.bundle.name}@{self.bundle.short_id}"

    async def collect(self, request: Request) -> list[Choice]:
        """Wait for every sequence to finish (non-streaming responses)."""
        choices = [Choice() for _ in self.seqs]
        remaining = len(self.seqs)
        try:
            while remaining:
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise ApiError(499, "client closed the request") from None
                    continue
                choice = choices[index]
                if isinstance(event, TextDelta):
                    choice.text.append(event.text)
                elif isinstance(event, Finished):
                    choice.finish_reason = event.reason
                    choice.prompt_tokens = event.prompt_tokens
                    choice.completion_tokens = event.completion_tokens
                    choice.logprobs = event.logprobs
                    remaining -= 1
                else:
                    raise ApiError(event.status, event.message, code="generation_failed")
        finally:
            self.cancel()
        return choices

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every event until all sequences finish or one fails (streaming responses).

        The text a sequence made while the stream was waiting its turn on the event loop comes
        as one delta: a loop that falls behind sends fewer, longer events instead of falling
        further behind (vLLM's output collector does the same)."""
        remaining = len(self.seqs)
        try:
            while remaining:
                for index, event in merge_text(await take_waiting(self.queue)):
                    yield index, event
                    if isinstance(event, Failed):
                        return
                    if isinstance(event, Finished):
                        remaining -= 1
        finally:
            # Reached on normal end, on failure, and when the client disconnects (Starlette
            # cancels the response task): the engine drops cancelled sequences at its next step.
            self.cancel()


async def take_waiting(queue: asyncio.Queue[tuple[int, Event]]) -> list[tuple[int, Event]]:
    """What ``queue`` holds, waiting for at least one item."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def merge_text(events: list[tuple[int, Event]]) -> list[tuple[int, Event]]:
    """``events`` with each sequence's consecutive text deltas joined into one; every
    sequence's events keep their order."""
    if len(events) == 1:
        return events  # the usual case while the loop keeps up
    merged: list[tuple[int, Event]] = []
    runs: dict[int, tuple[int, list[str]]] = {}  # an open run of text: its place in merged

    def close(index: int) -> None:
        place, parts = runs.pop(index)
        if len(parts) > 1:
            merged[place] = (index, TextDelta("".join(parts)))

    for index, event in events:
        if isinstance(event, TextDelta):
            if index in runs:
                runs[index][1].append(event.text)
                continue
            runs[index] = (len(merged), [event.text])
        elif index in runs:
            close(index)
        merged.append((index, event))
    for index in list(runs):
        close(index)
    return merged


async def start_generation(
    replica: Replica,
    body: CompletionRequest | ChatCompletionRequest,
    prepare: Callable[[ModelView], list[list[int]]],
    requested: int | None,
    default: int | None,
    endpoint: str,
) -> Generation:
    """Tokenize for the model that will run the request (on the event loop where that is
    short: ``tokenized_inline``) and hand its sequences to the engine."""
    inline = tokenized_inline(body)
    for _ in range(PREPARE_ATTEMPTS):
        bundle = replica.admit(body.model)
        prompts = prepare(bundle) if inline else await asyncio.to_thread(prepare, bundle)
        params = sampling_params(replica.settings, bundle, body, requested, prompts, default)
        try:
            return Generation(replica, bundle, prompts, params, endpoint)
        except StaleModelError:
            continue  # a reload swapped models while we tokenized: prepare again
    raise ApiError(503, "the model changed while the request was prepared; retry", code="reload")
