"""The batches: the active sequences of one model on one decode path, behind one protocol.

``DynamicBatch`` runs the transformers forward with a growable, left-padded KV cache (the default
on CPU); ``StaticBatch`` runs ``metalserve.staticdecode`` (a static KV cache with one slot per
sequence; on CUDA, decode steps replayed as CUDA graphs).

Batch invariance: each row has its own positions, its own attention mask and its own RNG, so a
sequence's tokens do not depend on its batch mates (bit-for-bit up to floating-point reduction
order, which in practice does not change greedy choices).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from metalserve.engine.sequence import (
    EngineObserver,
    Event,
    Failed,
    Finished,
    Sequence,
    TextDelta,
)
from metalserve.sampling import SamplingParams, choose_tokens_tensor, token_logprobs

if TYPE_CHECKING:
    import torch
    from torch.nn.attention import SDPBackend
    from transformers.cache_utils import Cache

    from metalserve.loader import LoadedModel, ModelView
    from metalserve.staticdecode import StaticDecoder


# The warm-up that proves a model generates before it serves (and, with tensor parallelism,
# that its ranks together give the whole model's greedy text).
WARMUP_PROMPT = "Hello"
WARMUP_TOKENS = 4


def warmup_prompt(bundle: ModelView) -> list[int]:
    """The warm-up's prompt, by the tokenizer the engine decodes with: transformers' is the API
    side's, and an engine's process need not import it."""
    ids: list[int] = bundle.tokenizer.backend.encode(WARMUP_PROMPT).ids
    return ids


# The static path times one decode step in this many on the device (metalserve_forward_pass_
# part_seconds{part="device"}); every prefill.
DEVICE_TIMED_STEPS = 8


class Batch(Protocol):
    """What the engine loop needs of a batch: the active sequences of one model, advanced one
    forward pass at a time by the engine thread (``DynamicBatch`` and ``StaticBatch``)."""

    seqs: list[Sequence]
    forward_passes: int
    observer: EngineObserver | None

    def __len__(self) -> int: ...

    def add(self, new: list[Sequence]) -> None:
        """Prefill ``new``, emit their first tokens, join the batch."""

    def step(self) -> None:
        """One decode step over every active sequence."""

    def evict_done(self) -> None:
        """Drop finished and cancelled sequences."""

    def clear(self) -> None:
        """Forget every sequence (after they were failed)."""

    def capture_deferred(self) -> bool:
        """While no sequence is active: one piece of the start's work left for such moments
        (a CUDA graph); whether any is left."""

    def deferred_count(self) -> int:
        """How many pieces of that work are left."""


@dataclass(eq=False)
class _BatchTensors:
    cache: Cache
    mask: torch.Tensor  # [batch, cache length] 1 for real tokens, 0 for left padding
    positions: torch.Tensor  # [batch] position id of each row's next token
    last_tokens: torch.Tensor  # [batch] the token each row feeds to the next decode step


class DynamicBatch:
    """The active sequences of one model on the dynamic path (the transformers forward) with
    their shared, left-padded, growing KV cache."""

    def __init__(self, bundle: LoadedModel, observer: EngineObserver | None = None) -> None:
        self.bundle = bundle
        self.observer = observer
        self.seqs: list[Sequence] = []
        self.forward_passes = 0
        self._tensors: _BatchTensors | None = None
        self._clock = _PassClock(bundle.device)

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, new: list[Sequence]) -> None:
        """Prefill ``new`` in one forward pass, emit their first tokens, join the batch."""
        import torch

        from metalserve import kvcache

        clock = self._clock.start()
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
            clock.forward_begins()
            logits = self._forward(ids, mask, positions, cache)
            clock.forward_ends()
            params = [s.params for s in new]
            chosen = choose_tokens_tensor(logits, params, [s.generator for s in new])
            logprobs = token_logprobs(logits, chosen, params)
            clock.launched()
            tokens: list[int] = chosen.tolist()
            clock.synced()
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
            for seq, token, logprob in zip(new, tokens, logprobs.read(), strict=True):
                seq.append(token, self.observer, logprob)
            clock.count(self, "prefill", len(new))
            self.evict_done()

    def step(self) -> None:
        """One decode forward over every active sequence."""
        import torch

        state = self._tensors
        if state is None or not self.seqs:
            return
        clock = self._clock.start()
        with torch.inference_mode():
            state.mask = torch.cat([state.mask, state.mask.new_ones((len(self.seqs), 1))], dim=1)
            clock.forward_begins()
            logits = self._forward(
                state.last_tokens[:, None],
                state.mask,
                state.positions[:, None],
                state.cache,
            )
            clock.forward_ends()
            params = [s.params for s in self.seqs]
            chosen = choose_tokens_tensor(logits, params, [s.generator for s in self.seqs])
            logprobs = token_logprobs(logits, chosen, params)
            clock.launched()
            tokens: list[int] = chosen.tolist()
            clock.synced()
            state.positions = state.positions + 1
            state.last_tokens = chosen
            for seq, token, logprob in zip(self.seqs, tokens, logprobs.read(), strict=True):
                seq.append(token, self.observer, logprob)
            clock.count(self, "decode", len(self.seqs))
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

    def capture_deferred(self) -> bool:
        return False  # no graphs

    def deferred_count(self) -> int:
        return 0

    def _forward(
        self,
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
        logits: torch.Tensor = output.logits[:, -1, :]
        return logits


class StaticBatch:
    """The active sequences of one model on the static path (``metalserve.staticdecode``).

    A ``Batch`` as ``DynamicBatch`` is. Sequence ``i`` of ``seqs`` lives in slot ``i`` of the
    decoder's static KV cache; a step is one (on CUDA graph-replayed) forward over slots
    ``0..n-1``, one batched token choice and one host sync.
    """

    def __init__(
        self, bundle: LoadedModel, decoder: StaticDecoder, observer: EngineObserver | None = None
    ) -> None:
        self.bundle = bundle
        self.decoder = decoder
        self.observer = observer
        self.seqs: list[Sequence] = []
        self.forward_passes = 0
        self._clock = _PassClock(bundle.device)

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, new: list[Sequence]) -> None:
        """Prefill ``new`` into the next free slots, emit their first tokens, join the batch."""
        import torch

        clock = self._clock.start()
        with torch.inference_mode():
            first = len(self.seqs)
            for seq in new:
                seq.start()
            prompts = [s.prompt_ids for s in new]
            clock.forward_begins()
            logits, reused = self.decoder.prefill_prompts(prompts, first)
            clock.forward_ends()
            if self.decoder.prefix is not None and self.observer is not None:
                self.observer.prefix_cache(sum(len(p) for p in prompts), reused)
            lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
            params = [s.params for s in new]
            chosen = choose_tokens_tensor(logits, params, [s.generator for s in new])
            logprobs = token_logprobs(logits, chosen, params)
            self.decoder.admit(first, chosen, lengths)
            clock.launched()
            tokens = self.decoder.to_host(chosen)
            clock.synced()
            self.seqs.extend(new)
            for seq, token, logprob in zip(new, tokens, logprobs.read(), strict=True):
                seq.append(token, self.observer, logprob)
            clock.count(self, "prefill", len(new))
            self.evict_done()

    def step(self) -> None:
        """One decode step over every active sequence."""
        import torch

        seqs = self.seqs
        if not seqs:
            return
        # Every prefill's forward is timed on the device, every DEVICE_TIMED_STEPS-th decode
        # step's (two events and a query: a few microseconds, an estimate, against an 850M
        # step's 1 ms).
        clock = self._clock.start(on_device=self.forward_passes % DEVICE_TIMED_STEPS == 0)
        with torch.inference_mode():
            # The position each row feeds now: its prompt and all but its newest token are cached.
            last = max(len(s.prompt_ids) + len(s.generated) for s in seqs) - 1
            clock.forward_begins()
            logits = self.decoder.decode(len(seqs), last)
            clock.forward_ends()
            params = [s.params for s in seqs]
            chosen = choose_tokens_tensor(logits, params, [s.generator for s in seqs])
            logprobs = token_logprobs(logits, chosen, params)
            self.decoder.advance(len(seqs), chosen)
            clock.launched()
            tokens = self.decoder.to_host(chosen)
            clock.synced()
            for seq, token, logprob in zip(seqs, tokens, logprobs.read(), strict=True):
                seq.append(token, self.observer, logprob)
            clock.count(self, "decode", len(seqs))
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

    def capture_deferred(self) -> bool:
        return self.decoder.capture_deferred()

    def deferred_count(self) -> int:
        return self.decoder.deferred_count()


class _PassClock:
    """Where one forward pass's time goes (``metalserve_forward_pass_part_seconds``): "host",
    from its start to its last launch (Python, launches and any wait among them); "host_cpu",
    the engine thread's CPU time in that part (the rest of "host" it was off the CPU: waiting
    for the GIL while the HTTP event loop ran Python, or for a core); "wait", for
    its tokens on the host after that; "device" (CUDA), the device's time for the forward itself
    (events around it: a graph's run, or an eager forward's kernels and the gaps between their
    launches); "emit", from the tokens on the host until the sequences have them as text and
    events (on the dynamic path after a prefill, merging the new rows' cache too). The pass's
    duration, as before, is from its start to its tokens on the host."""

    def __init__(self, device: torch.device) -> None:
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            import torch

            self._events = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            self._stream = torch.cuda.current_stream(device)
        self.start()

    def start(self, *, on_device: bool = True) -> _PassClock:
        """A new pass; ``on_device``: time its forward on the device too (where CUDA)."""
        self._started = self._launched = self._synced = time.perf_counter()
        self._cpu_started = self._cpu_launched = time.thread_time()
        self._timing = self._events if on_device else None
        return self

    def forward_begins(self) -> None:
        if self._timing is not None:
            self._timing[0].record(self._stream)

    def forward_ends(self) -> None:
        if self._timing is not None:
            self._timing[1].record(self._stream)

    def launched(self) -> None:
        self._launched = time.perf_counter()
        self._cpu_launched = time.thread_time()

    def synced(self) -> None:
        self._synced = time.perf_counter()

    def count(self, batch: DynamicBatch | StaticBatch, phase: str, rows: int) -> None:
        """One forward pass of ``rows`` sequences, its tokens emitted now."""
        batch.forward_passes += 1
        if batch.observer is None:
            return
        parts = {
            "host": self._launched - self._started,
            "host_cpu": self._cpu_launched - self._cpu_started,
            "wait": self._synced - self._launched,
            "emit": time.perf_counter() - self._synced,
        }
        # Both events have run once the tokens are on the host; a pass whose end has not
        # (its wait on another stream, say) goes untimed rather than failing its batch.
        if self._timing is not None and self._timing[1].query():
            parts["device"] = self._timing[0].elapsed_time(self._timing[1]) / 1e3
        batch.observer.forward_pass(phase, rows, self._synced - self._started, parts)


@functools.cache
def _attention_backends() -> list[SDPBackend]:
    """Every SDPA backend but cuDNN's: it builds a new execution plan for each new key length,
    i.e. on every decode step (measured on an H100: ~20 ms per attention call in bf16)."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def generate_once(
    bundle: LoadedModel,
    prompt_ids: list[int],
    params: SamplingParams,
    step_delay: float = 0.0,
    batch: Batch | None = None,
) -> str:
    """Run one sequence to completion outside the engine (warm-up of a model being loaded).

    Here, not in the loop module: it drives a batch directly (default: a ``DynamicBatch``), with
    no thread or queue."""
    events: list[Event] = []
    seq = Sequence(bundle=bundle, prompt_ids=prompt_ids, params=params, sink=events.append)
    if batch is None:
        batch = _one_sequence_batch(bundle, len(prompt_ids) + params.max_tokens)
    batch.add([seq])
    while batch.seqs:
        time.sleep(step_delay)
        batch.step()
    failures = [e for e in events if isinstance(e, Failed)]
    if failures or not any(isinstance(e, Finished) for e in events):
        raise RuntimeError(f"warm-up generation failed: {failures}")
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def _one_sequence_batch(bundle: LoadedModel, tokens: int) -> Batch:
    """A batch for one sequence of up to ``tokens`` tokens: the dynamic path's, or for a model
    without one (``loader.static_path_only``) a static cache of one slot, eager: its decoder
    fuses the layers' projections (views: no memory kept) and is gone with the batch."""
    from metalserve.loader import static_path_only

    if not static_path_only(bundle.model):
        return DynamicBatch(bundle)
    from metalserve.staticdecode import StaticDecoder

    decoder = StaticDecoder(
        bundle.model,
        slots=1,
        max_length=min(bundle.max_context, tokens),
        device=bundle.device,
        dtype=bundle.dtype,
        cuda_graphs=False,
        attention="bucketed",  # torch's attention: no kernel to compile for a warm-up
    )
    # Nor the fused layer kernels: on the load's thread, whose current device is not set.
    decoder.fused = False
    return StaticBatch(bundle, decoder)
