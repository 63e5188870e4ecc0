"""One prompt being completed (``Sequence``), the events it sends its sink, and what the engine
reports to its observer."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from metalserve.detokenize import IncrementalDetokenizer, StopMatcher
from metalserve.sampling import SamplingParams, TokenLogprob, make_generator

if TYPE_CHECKING:
    import torch

    from metalserve.loader import ModelView


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str  # "stop" or "length", as in the OpenAI API
    prompt_tokens: int
    completion_tokens: int
    # Per generated token (token id, its TokenLogprob), when the request asked for logprobs.
    logprobs: tuple[tuple[int, TokenLogprob], ...] | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    status: int
    message: str


Event = TextDelta | Finished | Failed


class EngineObserver(Protocol):
    """What the engine reports (implemented by metalserve.metrics.Metrics)."""

    def forward_pass(
        self, phase: str, batch_size: int, seconds: float, parts: dict[str, float]
    ) -> None: ...
    def engine_state(self, running: int, waiting: int, kv_cache_usage: float) -> None: ...
    def request_queued(self, seconds: float) -> None: ...
    def prefix_cache(self, prompt_tokens: int, reused_tokens: int) -> None: ...
    def first_token(self, endpoint: str, seconds: float) -> None: ...
    def sequence_finished(
        self, reason: str, prompt_tokens: int, completion_tokens: int
    ) -> None: ...
    def deferred_graphs(self, count: int) -> None: ...


@dataclass(eq=False)
class Sequence:
    """One prompt being completed. The API thread creates it, the engine thread advances it."""

    # Its model's view: the API side's, in the engine's process the loaded model itself.
    bundle: ModelView
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    endpoint: str = "internal"
    created_at: float = field(default_factory=time.monotonic)
    # Phase times (monotonic) stamped by the engine thread, for tracing.
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False  # set by the API when the client goes away
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: bool = False
    generator: torch.Generator | None = None
    _detok: IncrementalDetokenizer | None = None
    _stops: StopMatcher | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def start(self) -> None:
        """Engine side: prepare per-sequence decoding state on admission."""
        # Greedy rows draw nothing: no generator (on CUDA each costs the engine thread calls
        # that let go of the GIL, in the prefill of a wave of requests).
        if not self.params.greedy:
            self.generator = make_generator(self.bundle.device, self.params.seed)
        self._detok = IncrementalDetokenizer(self.bundle.tokenizer.backend)
        self._stops = StopMatcher(self.params.stop)

    def append(
        self, token: int, observer: EngineObserver | None, logprob: TokenLogprob | None = None
    ) -> None:
        """Engine side: record one sampled token and emit text; finish when a limit is hit."""
        detok, stops = self._decoding()
        if logprob is not None:
            self.logprobs.append(logprob)
        if not self.generated:
            self.first_token_at = time.monotonic()
            if observer is not None:
                observer.first_token(self.endpoint, self.first_token_at - self.created_at)
        self.generated.append(token)
        if token in self.bundle.eos_token_ids and not self.params.ignore_eos:
            self._finish("stop", observer)
            return
        text, stopped = stops.feed(detok.push(token))
        if text:
            self.sink(TextDelta(text))
        if stopped:
            self._finish("stop", observer, flush=False)
        elif len(self.generated) >= self.params.max_tokens or (
            len(self.prompt_ids) + len(self.generated) >= self.bundle.max_context
        ):
            self._finish("length", observer)

    def _decoding(self) -> tuple[IncrementalDetokenizer, StopMatcher]:
        if self._detok is None or self._stops is None:
            raise RuntimeError("sequence used before start()")
        return self._detok, self._stops

    def fail(self, status: int, message: str, observer: EngineObserver | None) -> None:
        if self.done:
            return
        self.done = True
        self.finished_at = time.monotonic()
        self.sink(Failed(status, message))
        if observer is not None:
            observer.sequence_finished(
                "cancelled" if self.cancelled else "error",
                len(self.prompt_ids),
                len(self.generated),
            )

    def _finish(self, reason: str, observer: EngineObserver | None, *, flush: bool = True) -> None:
        detok, stops = self._decoding()
        if flush:
            text, stopped = stops.feed(detok.flush(), final=True)
            if text:
                self.sink(TextDelta(text))
            reason = "stop" if stopped else reason
        self.done = True
        self.finished_at = time.monotonic()
        logprobs = None
        if self.params.logprobs is not None:
            logprobs = tuple(zip(self.generated, self.logprobs, strict=True))
        self.sink(Finished(reason, len(self.prompt_ids), len(self.generated), logprobs))
        if observer is not None:
            observer.sequence_finished(reason, len(self.prompt_ids), len(self.generated))
