"""Continuous-batching generation engine.

One thread owns the model. Each iteration it admits waiting sequences (up to ``max_batch_size``
active ones), prefills them together in one forward pass (left-padded, with attention mask and
per-row position ids), merges their KV cache into the running batch, and then runs one batched
decode forward over every active sequence. Finished and cancelled sequences leave between steps.

Batch invariance: each row has its own positions, its own attention mask and its own RNG, so a
sequence's tokens do not depend on its batch mates (bit-for-bit up to floating-point reduction
order, which in practice does not change greedy choices).

Decode paths (``decode_mode``): ``Batch`` above is the dynamic one (transformers forward, growable
cache; the default on CPU). ``StaticBatch`` runs ``metalserve.staticdecode``: a static KV cache
with one slot per sequence and, on CUDA (the default there), decode steps replayed as CUDA graphs.
The engine picks the path when a model goes live and falls back to the dynamic one (with a
warning) when the model or the device memory does not allow the static one. Events go to the
sinks as they happen; ``flush_events`` runs after every iteration, so a sink may batch them.

Hot reload (double buffer): ``swap()`` hands over a fully loaded model. Sequences prepared for
the current model (everything queued before the swap was requested) still run on it; once the
batch is empty the engine switches (building the new model's batch, graphs included, outside the
lock), and sequences prepared for the new model start. So no request fails or mixes models; new
requests wait at most as long as the longest in-flight generation (plus the new batch's set-up).

Liveness: the loop stamps a heartbeat (``heartbeat_age``) at the top of every iteration, between a
prefill and its decode step, and around a model switch; an idle loop waits at most ``idle_wait``
seconds, so the heartbeat advances while nothing happens too. The systemd watchdog pinger
(``metalserve.sdnotify``) pings only while the heartbeat is fresh: a dead or wedged loop gets the
process restarted. Model loads and warm-ups run on the loader's thread, never in this loop, so
the longest gap between two beats is one forward pass (a prefill of up to ``max_batch_size``
prompts) or one switch (building a static batch: its CUDA graphs, ~1-2 s). ``wedge`` (fault
injection for lab proofs) blocks the loop on purpose.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from metalserve.detokenize import IncrementalDetokenizer, StopMatcher
from metalserve.sampling import (
    SamplingParams,
    choose_tokens,
    choose_tokens_tensor,
    make_generator,
)

if TYPE_CHECKING:
    import torch
    from torch.nn.attention import SDPBackend
    from transformers.cache_utils import Cache

    from metalserve.loader import LoadedModel
    from metalserve.staticdecode import StaticDecoder

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "dynamic", "static", "cuda-graphs")

# After this many consecutive failed steps the engine thread gives up, so /healthz reports the
# replica dead and the supervisor restarts it instead of failing every request forever.
MAX_CONSECUTIVE_FAILURES = 3
# Longest wait of an idle engine loop: the heartbeat advances at least this often when idle.
IDLE_WAIT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str  # "stop" or "length", as in the OpenAI API
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Failed:
    status: int
    message: str


Event = TextDelta | Finished | Failed


class EngineObserver(Protocol):
    """What the engine reports (implemented by metalserve.metrics.Metrics)."""

    def forward_pass(self, phase: str, batch_size: int) -> None: ...
    def queue_depth(self, depth: int) -> None: ...
    def first_token(self, endpoint: str, seconds: float) -> None: ...
    def sequence_finished(
        self, reason: str, prompt_tokens: int, completion_tokens: int
    ) -> None: ...


class QueueFullError(Exception):
    """Too many requests are waiting already."""


class StaleModelError(Exception):
    """The sequence was prepared for a model that is no longer (or not yet) the engine's."""


@dataclass(eq=False)
class Sequence:
    """One prompt being completed. The API thread creates it, the engine thread advances it."""

    bundle: LoadedModel
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    endpoint: str = "internal"
    created_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the API when the client goes away
    generated: list[int] = field(default_factory=list)
    done: bool = False
    generator: torch.Generator | None = None
    _detok: IncrementalDetokenizer | None = None
    _stops: StopMatcher | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def start(self) -> None:
        """Engine side: prepare per-sequence decoding state on admission."""
        self.generator = make_generator(self.bundle.device, self.params.seed)
        self._detok = IncrementalDetokenizer(self.bundle.tokenizer.backend_tokenizer)
        self._stops = StopMatcher(self.params.stop)

    def append(self, token: int, observer: EngineObserver | None) -> None:
        """Engine side: record one sampled token and emit text; finish when a limit is hit."""
        detok, stops = self._decoding()
        if not self.generated and observer is not None:
            observer.first_token(self.endpoint, time.monotonic() - self.created_at)
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
        self.sink(Finished(reason, len(self.prompt_ids), len(self.generated)))
        if observer is not None:
            observer.sequence_finished(reason, len(self.prompt_ids), len(self.generated))


@dataclass(eq=False)
class _BatchTensors:
    cache: Cache
    mask: torch.Tensor  # [batch, cache length] 1 for real tokens, 0 for left padding
    positions: torch.Tensor  # [batch] position id of each row's next token
    last_tokens: torch.Tensor  # [batch] the token each row feeds to the next decode step


class Batch:
    """The active sequences of one model with their shared, left-padded KV cache."""

    def __init__(self, bundle: LoadedModel, observer: EngineObserver | None = None) -> None:
        self.bundle = bundle
        self.observer = observer
        self.seqs: list[Sequence] = []
        self.forward_passes = 0
        self._tensors: _BatchTensors | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, new: list[Sequence]) -> None:
        """Prefill ``new`` in one forward pass, emit their first tokens, join the batch."""
        import torch

        from metalserve import kvcache

        with torch.inference_mode():
            device = self.bundle.device
            longest = max(len(s.prompt_ids) for s in new)
            ids = torch.full((len(new), longest), self.bundle.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(new), longest), dtype=torch.long)
            for row, seq in enumerate(new):
                seq.start()
                ids[row, longest - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
                mask[row, longest - len(seq.prompt_ids) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = kvcache.new_cache()
            logits = self._forward("prefill", ids, mask, positions, cache)
            tokens = choose_tokens(logits, [s.params for s in new], [_generator(s) for s in new])
            added = _BatchTensors(
                cache=cache,
                mask=mask,
                positions=mask.sum(-1),
                last_tokens=torch.tensor(tokens, dtype=torch.long, device=device),
            )
            old = self._tensors
            if old is None:
                self._tensors = added
            else:
                merged = kvcache.concat_left_padded(old.cache, cache)
                length = merged.get_seq_length()
                self._tensors = _BatchTensors(
                    cache=merged,
                    mask=torch.cat(
                        [
                            kvcache.left_pad_mask(old.mask, length),
                            kvcache.left_pad_mask(mask, length),
                        ]
                    ),
                    positions=torch.cat([old.positions, added.positions]),
                    last_tokens=torch.cat([old.last_tokens, added.last_tokens]),
                )
            self.seqs.extend(new)
            for seq, token in zip(new, tokens, strict=True):
                seq.append(token, self.observer)
            self.evict_done()

    def step(self) -> None:
        """One decode forward over every active sequence."""
        import torch

        state = self._tensors
        if state is None or not self.seqs:
            return
        with torch.inference_mode():
            state.mask = torch.cat([state.mask, state.mask.new_ones((len(self.seqs), 1))], dim=1)
            logits = self._forward(
                "decode",
                state.last_tokens[:, None],
                state.mask,
                state.positions[:, None],
                state.cache,
            )
            tokens = choose_tokens(
                logits, [s.params for s in self.seqs], [_generator(s) for s in self.seqs]
            )
            state.positions = state.positions + 1
            state.last_tokens = torch.tensor(tokens, dtype=torch.long, device=self.bundle.device)
            for seq, token in zip(self.seqs, tokens, strict=True):
                seq.append(token, self.observer)
            self.evict_done()

    def evict_done(self) -> None:
        """Drop finished and cancelled rows, and the cache columns only they still needed."""
        import torch

        from metalserve import kvcache

        for seq in self.seqs:
            if seq.cancelled and not seq.done:
                seq.fail(499, "client went away", self.observer)
        keep = [i for i, s in enumerate(self.seqs) if not s.done]
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        state = self._tensors
        if not keep or state is None:
            self.clear()
            return
        with torch.inference_mode():
            rows = torch.tensor(keep, dtype=torch.long, device=state.mask.device)
            mask = state.mask.index_select(0, rows)
            # Columns that are padding for every remaining row can go.
            first = int(mask.any(dim=0).nonzero()[0, 0])
            kvcache.select_rows(state.cache, rows, first)
            state.mask = mask[:, first:]
            state.positions = state.positions.index_select(0, rows)
            state.last_tokens = state.last_tokens.index_select(0, rows)

    def clear(self) -> None:
        self.seqs = []
        self._tensors = None

    def _forward(
        self,
        phase: str,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Cache,
    ) -> torch.Tensor:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_attention_backends()):
            output = self.bundle.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.forward_passes += 1
        if self.observer is not None:
            self.observer.forward_pass(phase, ids.shape[0])
        logits: torch.Tensor = output.logits[:, -1, :]
        return logits


class StaticBatch:
    """The active sequences of one model on the static path (``metalserve.staticdecode``).

    Same interface as ``Batch``. Sequence ``i`` of ``seqs`` lives in slot ``i`` of the decoder's
    static KV cache; a step is one (on CUDA graph-replayed) forward over slots ``0..n-1``, one
    batched token choice and one host sync.
    """

    def __init__(
        self, bundle: LoadedModel, decoder: StaticDecoder, observer: EngineObserver | None = None
    ) -> None:
        self.bundle = bundle
        self.decoder = decoder
        self.observer = observer
        self.seqs: list[Sequence] = []
        self.forward_passes = 0

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, new: list[Sequence]) -> None:
        """Prefill ``new`` into the next free slots, emit their first tokens, join the batch."""
        import torch

        with torch.inference_mode():
            first = len(self.seqs)
            longest = max(len(s.prompt_ids) for s in new)
            ids = torch.full((len(new), longest), self.bundle.pad_token_id, dtype=torch.long)
            for row, seq in enumerate(new):
                seq.start()
                ids[row, : len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids)
            lengths = torch.tensor([len(s.prompt_ids) for s in new], dtype=torch.long)
            logits = self.decoder.prefill(ids, lengths, first)
            self._count("prefill", len(new))
            chosen = choose_tokens_tensor(
                logits, [s.params for s in new], [_generator(s) for s in new]
            )
            self.decoder.admit(first, chosen, lengths)
            tokens = self.decoder.to_host(chosen)
            self.seqs.extend(new)
            for seq, token in zip(new, tokens, strict=True):
                seq.append(token, self.observer)
            self.evict_done()

    def step(self) -> None:
        """One decode step over every active sequence."""
        import torch

        seqs = self.seqs
        if not seqs:
            return
        with torch.inference_mode():
            # The position each row feeds now: its prompt and all but its newest token are cached.
            last = max(len(s.prompt_ids) + len(s.generated) for s in seqs) - 1
            logits = self.decoder.decode(len(seqs), last)
            self._count("decode", len(seqs))
            chosen = choose_tokens_tensor(
                logits, [s.params for s in seqs], [_generator(s) for s in seqs]
            )
            self.decoder.advance(len(seqs), chosen)
            tokens = self.decoder.to_host(chosen)
            for seq, token in zip(seqs, tokens, strict=True):
                seq.append(token, self.observer)
            self.evict_done()

    def evict_done(self) -> None:
        """Drop finished and cancelled sequences; the last ones move into the freed slots."""
        import torch

        for seq in self.seqs:
            if seq.cancelled and not seq.done:
                seq.fail(499, "client went away", self.observer)
        kept = sum(not s.done for s in self.seqs)
        if kept == len(self.seqs):
            return
        holes = [i for i in range(kept) if self.seqs[i].done]
        movers = [j for j in range(kept, len(self.seqs)) if not self.seqs[j].done]
        if movers:
            length = max(len(self.seqs[j].prompt_ids) + len(self.seqs[j].generated) for j in movers)
            with torch.inference_mode():
                self.decoder.move(movers, holes, length)
            for hole, mover in zip(holes, movers, strict=True):
                self.seqs[hole] = self.seqs[mover]
        self.seqs = self.seqs[:kept]

    def clear(self) -> None:
        self.seqs = []

    def _count(self, phase: str, rows: int) -> None:
        self.forward_passes += 1
        if self.observer is not None:
            self.observer.forward_pass(phase, rows)


@functools.cache
def _attention_backends() -> list[SDPBackend]:
    """Every SDPA backend but cuDNN's: it builds a new execution plan for each new key length,
    i.e. on every decode step (measured on an H100: ~20 ms per attention call in bf16)."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _generator(seq: Sequence) -> torch.Generator:
    assert seq.generator is not None
    return seq.generator


def generate_once(
    bundle: LoadedModel, prompt_ids: list[int], params: SamplingParams, step_delay: float = 0.0
) -> str:
    """Run one sequence to completion outside the engine (warm-up of a model being loaded)."""
    events: list[Event] = []
    seq = Sequence(bundle=bundle, prompt_ids=prompt_ids, params=params, sink=events.append)
    batch = Batch(bundle)
    batch.add([seq])
    while batch.seqs:
        time.sleep(step_delay)
        batch.step()
    failures = [e for e in events if isinstance(e, Failed)]
    if failures or not any(isinstance(e, Finished) for e in events):
        raise RuntimeError(f"warm-up generation failed: {failures}")
    return "".join(e.text for e in events if isinstance(e, TextDelta))


class Engine:
    """Owns the generation thread, the waiting queue and the live model."""

    def __init__(
        self,
        *,
        max_batch_size: int = 16,
        max_queue: int = 1024,
        observer: EngineObserver | None = None,
        step_delay: float = 0.0,
        decode_mode: str = "auto",
        flush_events: Callable[[], None] | None = None,
        idle_wait: float = IDLE_WAIT_SECONDS,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}")
        if idle_wait <= 0:
            raise ValueError("idle_wait must be > 0")
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.observer = observer
        self.step_delay = step_delay
        self.decode_mode = decode_mode
        self.idle_wait = idle_wait
        # Called after every engine iteration: sinks may buffer events until then (one hand-off
        # to the event loop per step instead of one per token).
        self._flush_events = flush_events or (lambda: None)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._current: LoadedModel | None = None
        self._batch: Batch | StaticBatch | None = None
        self._switching = False  # a swap is being prepared outside the lock
        self._pending: tuple[LoadedModel, concurrent.futures.Future[LoadedModel | None]] | None = (
            None
        )
        self._abort: str | None = None
        self._stopping = False
        self._forward_passes = 0
        # Liveness: monotonic time of the loop's last sign of progress (engine thread writes).
        self._heartbeat = time.monotonic()
        # Fault injection: a pending wedge (seconds, and a future done once the loop is
        # blocked), and the event that ends a wedge early (stop()).
        self._wedge: tuple[float, concurrent.futures.Future[None]] | None = None
        self._unwedge = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metalserve-engine", daemon=True)

    # --- API side (any thread) -------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        """The model sequences run on now."""
        return self._current

    @property
    def target_model(self) -> LoadedModel | None:
        """The model new sequences must be prepared for (the incoming one during a swap)."""
        pending = self._pending
        return pending[0] if pending is not None else self._current

    @property
    def forward_passes(self) -> int:
        batch = self._batch
        return self._forward_passes + (batch.forward_passes if batch is not None else 0)

    @property
    def decode_path(self) -> str | None:
        """The decode path of the current model: cuda-graphs, static or dynamic."""
        batch = self._batch
        if isinstance(batch, StaticBatch):
            return "cuda-graphs" if batch.decoder.cuda_graphs else "static"
        return "dynamic" if batch is not None else None

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def heartbeat_age(self) -> float:
        """Seconds since the engine loop last made progress; infinite once its thread is gone
        (or before it started)."""
        if not self._thread.is_alive():
            return float("inf")
        return time.monotonic() - self._heartbeat

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._unwedge.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                raise RuntimeError("the engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            if seq.bundle is not self.target_model and (
                seq.bundle is not self._current or self._switching
            ):
                raise StaleModelError(seq.bundle.short_id)
            self._waiting.append(seq)
            self._report_queue()
            self._cond.notify_all()

    def swap(self, bundle: LoadedModel) -> concurrent.futures.Future[LoadedModel | None]:
        """Switch to ``bundle`` between steps; the future yields the replaced model (or None)."""
        future: concurrent.futures.Future[LoadedModel | None] = concurrent.futures.Future()
        with self._cond:
            if self._pending is not None:
                raise RuntimeError("a model swap is already pending")
            self._pending = (bundle, future)
            self._cond.notify_all()
        return future

    def abort_all(self, message: str) -> None:
        """Fail every queued and running sequence (drain timeout)."""
        with self._cond:
            self._abort = message
            self._cond.notify_all()

    def wedge(self, seconds: float) -> concurrent.futures.Future[None]:
        """Fault injection: block the engine loop for ``seconds`` at its next iteration, without
        heartbeat (the watchdog's proof). The future is done once the loop is blocked. Requests
        wait meanwhile; ``stop()`` ends a wedge early."""
        if seconds <= 0:
            raise ValueError("seconds must be > 0")
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                raise RuntimeError("the engine is not running")
            if self._wedge is not None:
                raise RuntimeError("a wedge is already pending")
            self._wedge = (seconds, future)
            self._cond.notify_all()
        return future

    # --- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            with self._cond:
                self._stopping = True
                self._fail_everything(503, "the generation engine stopped")
                if self._pending is not None:
                    self._pending[1].set_exception(RuntimeError("the engine stopped"))
                    self._pending = None
                if self._wedge is not None and self._wedge[1].set_running_or_notify_cancel():
                    self._wedge[1].set_exception(RuntimeError("the engine stopped"))
                self._wedge = None
            self._flush_events()

    def _loop(self) -> None:
        failures = 0
        while True:
            self._beat()
            if self._wedge is not None:
                self._hold()
                continue
            try:
                with self._cond:
                    if self._stopping:
                        break
                    if self._abort is not None:
                        self._fail_everything(503, self._abort)
                        self._abort = None
                    incoming = self._swap_due()
                    admitted = [] if incoming is not None else self._admit()
                    if incoming is None and not admitted and not self._batch:
                        # Bounded: the heartbeat must advance while idle.
                        self._cond.wait(timeout=self.idle_wait)
                        continue
                if incoming is not None:
                    self._switch(*incoming)
                    continue
                try:
                    self._step(admitted)
                    failures = 0
                except Exception:
                    failures += 1
                    log.exception("engine step failed (%d in a row)", failures)
                    with self._cond:
                        for seq in admitted:
                            seq.fail(500, "internal error during generation", self.observer)
                        self._fail_batch(500, "internal error during generation")
                    if failures >= MAX_CONSECUTIVE_FAILURES:
                        log.critical("engine stops after %d failed steps", failures)
                        return
            finally:
                self._flush_events()
            if self.step_delay:
                time.sleep(self.step_delay)

    def _beat(self) -> None:
        self._heartbeat = time.monotonic()

    def _hold(self) -> None:
        """Fault injection: block this loop (no heartbeat) as a wedged step would."""
        with self._cond:
            wedge, self._wedge = self._wedge, None
        if wedge is None:
            return
        seconds, blocked = wedge
        log.warning("fault injection: the engine loop blocks for %.1fs", seconds)
        if blocked.set_running_or_notify_cancel():  # else the caller stopped waiting for it
            blocked.set_result(None)
        self._unwedge.wait(seconds)
        log.warning("fault injection: the engine loop resumes")

    def _step(self, admitted: list[Sequence]) -> None:
        assert self._batch is not None
        if admitted:
            self._batch.add(admitted)
            self._flush_events()  # first tokens go out before the decode step
            self._beat()
        self._batch.step()

    def _admit(self) -> list[Sequence]:
        """Pop the sequences that can start now (FIFO, only those prepared for this model)."""
        if self._current is None or self._batch is None:
            return []
        room = self.max_batch_size - len(self._batch)
        admitted: list[Sequence] = []
        kept: deque[Sequence] = deque()
        while self._waiting:
            seq = self._waiting.popleft()
            if seq.cancelled:
                seq.fail(499, "client went away", self.observer)
            elif seq.bundle is self._current and len(admitted) < room:
                admitted.append(seq)
            elif seq.bundle is self._current or (
                self._pending is not None and seq.bundle is self._pending[0]
            ):
                kept.append(seq)
            else:  # unreachable: submit() refuses stale sequences, swaps wait for queued ones
                seq.fail(503, "the model was replaced; retry", self.observer)
        self._waiting = kept
        self._report_queue()
        return admitted

    def _swap_due(self) -> tuple[LoadedModel, concurrent.futures.Future[LoadedModel | None]] | None:
        """Under the lock: the pending swap, once the old model's work is done (else None).

        The old batch (and its static cache) is released here; ``_switch`` prepares the new one
        outside the lock, since capturing graphs takes a while."""
        if self._pending is None:
            return None
        if self._batch or any(s.bundle is self._current for s in self._waiting):
            return None  # finish the old model's work first
        if self._batch is not None:
            self._forward_passes += self._batch.forward_passes
        self._batch = None
        self._switching = True
        return self._pending

    def _switch(
        self, bundle: LoadedModel, future: concurrent.futures.Future[LoadedModel | None]
    ) -> None:
        self._beat()
        batch = self._new_batch(bundle)
        self._beat()
        with self._cond:
            old = self._current
            self._current, self._batch, self._pending = bundle, batch, None
            self._switching = False
            log.info("now serving version %s", bundle.short_id)
            future.set_result(old)
            self._cond.notify_all()

    def _new_batch(self, bundle: LoadedModel) -> Batch | StaticBatch:
        """The batch of a model on the decode path ``decode_mode`` asks for and the model and
        device allow (``auto``: CUDA graphs on CUDA, the dynamic path elsewhere)."""
        mode = self.decode_mode
        on_cuda = bundle.device.type == "cuda"
        if mode == "auto":
            mode = "cuda-graphs" if on_cuda else "dynamic"
        if mode == "dynamic":
            return Batch(bundle, self.observer)
        if mode == "cuda-graphs" and not on_cuda:
            log.warning("decode mode cuda-graphs needs a CUDA device; using the static path")
            mode = "static"
        from metalserve import staticdecode

        try:
            decoder = staticdecode.StaticDecoder(
                bundle.model,
                slots=self.max_batch_size,
                max_length=bundle.max_context,
                device=bundle.device,
                dtype=bundle.dtype,
                cuda_graphs=mode == "cuda-graphs",
            )
            decoder.capture_all()
        except staticdecode.StaticDecodeUnavailable as exc:
            log.warning("decode mode %s unavailable (%s); using the dynamic path", mode, exc)
            return Batch(bundle, self.observer)
        except Exception:
            log.exception("preparing decode mode %s failed; using the dynamic path", mode)
            return Batch(bundle, self.observer)
        log.info("decode path: %s", mode)
        return StaticBatch(bundle, decoder, self.observer)

    def _fail_batch(self, status: int, message: str) -> None:
        if self._batch is not None:
            for seq in self._batch.seqs:
                seq.fail(status, message, self.observer)
            self._batch.clear()

    def _fail_everything(self, status: int, message: str) -> None:
        self._fail_batch(status, message)
        while self._waiting:
            self._waiting.popleft().fail(status, message, self.observer)
        self._report_queue()

    def _report_queue(self) -> None:
        if self.observer is not None:
            self.observer.queue_depth(len(self._waiting))
