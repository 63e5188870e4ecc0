"""The engine loop: ``Engine`` owns the generation thread, the waiting queue and the live model.

Each iteration admits waiting sequences (up to ``batch_slots`` active ones: ``max_batch_size``, or
as many as the static KV cache holds where the device's memory holds fewer) into the batch,
which prefills them together in one forward pass, and then runs one batched decode step over
every active sequence. Finished and cancelled sequences leave between steps.

Decode path (``decode_mode``): the engine picks the batch kind when a model goes live
(``_new_batch``) and falls back to ``DynamicBatch`` (with a warning) when the model or the device
memory does not allow ``StaticBatch``. With ``tensor_parallel`` (rank 0 of a replica split over
processes) it is the static path (CUDA graphs and the compiled layer on CUDA, as on one GPU), with
no fallback: the other ranks repeat this decoder's
steps, and the engine's end stops them; at a hot reload's switch ``tensor_parallel_switch`` has
them load the new version (their load is part of the switch).

Hot reload (double buffer): ``swap()`` hands over a fully loaded model. Sequences prepared for
the current model (everything queued before the swap was requested) still run on it; once the
batch is empty the engine switches (building the new model's batch, graphs included, outside the
lock), and sequences prepared for the new model start. So no request fails or mixes models; new
requests wait at most as long as the longest in-flight generation (plus the new batch's set-up).

Liveness: the loop stamps a heartbeat (``heartbeat_age``) at the top of every iteration, between a
prefill and its decode step, and around a model switch; an idle loop waits at most ``idle_wait``
seconds, so the heartbeat advances while nothing happens too. The systemd watchdog pinger
(``metalserve.sdnotify``) pings only while the heartbeat is fresh: a dead or wedged loop gets the
process restarted. Model loads and a hot reload's warm-up run on the loader's thread, never in
this loop, so the longest gap between two beats is one forward pass (a prefill of up to
``batch_slots`` prompts) or one switch (building a static batch: its CUDA graphs, ~1-2 s; the
first version's warm-up on it). ``wedge`` (fault
injection for lab proofs) blocks the loop on purpose.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import faulthandler
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from metalserve import prefixcache
from metalserve.engine.batches import (
    WARMUP_TOKENS,
    Batch,
    DynamicBatch,
    StaticBatch,
    generate_once,
    warmup_prompt,
)
from metalserve.engine.profiling import PassProfile
from metalserve.engine.sequence import EngineObserver, Sequence
from metalserve.loader import LoadError, static_path_only
from metalserve.sampling import SamplingParams

if TYPE_CHECKING:
    from pathlib import Path

    from metalserve.loader import LoadedModel
    from metalserve.tensor_parallel import TensorParallel

# The package's name, as when this was one module: log lines keep their logger name.
log = logging.getLogger("metalserve.engine")

DECODE_MODES = ("auto", "dynamic", "static", "cuda-graphs")
# Whether the static path's decoder layer is compiled (torch.compile); auto: with CUDA graphs.
DECODE_COMPILE = ("auto", "on", "off")
DECODE_ATTENTION = ("auto", "bucketed", "own")  # staticdecode.ATTENTIONS
DECODE_GEMM = ("auto", "torch")  # staticdecode.GEMMS
# Weights of the static path's projections (metalserve.fp8); quantized when a model goes live.
QUANTIZATIONS = ("none", "fp8")
# A model switch (static cache, compiling the decode layer, capturing graphs) is one long step of
# the loop: the heartbeat advances meanwhile, for at most this long.
SWITCH_DEADLINE_SECONDS = 300.0

# After this many consecutive failed steps the engine thread gives up, so /healthz reports the
# replica dead and the supervisor restarts it instead of failing every request forever.
MAX_CONSECUTIVE_FAILURES = 3
# Longest wait of an idle engine loop: the heartbeat advances at least this often when idle.
IDLE_WAIT_SECONDS = 1.0


class QueueFullError(Exception):
    """Too many requests are waiting already."""


class StaleModelError(Exception):
    """The sequence was prepared for a model that is no longer (or not yet) the engine's."""


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
        decode_compile: str = "auto",
        decode_attention: str = "auto",
        decode_gemm: str = "auto",
        prefix_cache_tokens: int = prefixcache.DEFAULT_TOKENS,
        quantization: str = "none",
        flush_events: Callable[[], None] | None = None,
        idle_wait: float = IDLE_WAIT_SECONDS,
        reload_headroom: bool = False,
        release_replaced: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}")
        if decode_compile not in DECODE_COMPILE:
            raise ValueError(f"decode_compile must be one of {', '.join(DECODE_COMPILE)}")
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention must be one of {', '.join(DECODE_ATTENTION)}")
        if decode_gemm not in DECODE_GEMM:
            raise ValueError(f"decode_gemm must be one of {', '.join(DECODE_GEMM)}")
        if prefix_cache_tokens < 0:
            raise ValueError("prefix_cache_tokens must be >= 0")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
        if quantization != "none" and decode_mode == "dynamic":
            raise ValueError(f"quantization {quantization} needs the static decode path")
        if idle_wait <= 0:
            raise ValueError("idle_wait must be > 0")
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.observer = observer
        self.step_delay = step_delay
        self.decode_mode = decode_mode
        self.decode_compile = decode_compile
        self.decode_attention = decode_attention
        self.decode_gemm = decode_gemm
        self.prefix_cache_tokens = prefix_cache_tokens
        self.quantization = quantization
        self.idle_wait = idle_wait
        # Hot reloads load the next version beside the live one: the static cache leaves room
        # for a model of the live one's size.
        self.reload_headroom = reload_headroom
        # A replaced model is never used again (the replica's case, not the tests', which reuse
        # models): its weights go before the next one's static cache is sized, so that a hot
        # reload's cache gets what a fresh start's does.
        self.release_replaced = release_replaced
        # Rank 0 of a tensor-parallel replica: set before its first model goes live.
        self.tensor_parallel: TensorParallel | None = None
        # Tensor parallelism, a hot reload: called on this thread, the old version's work done,
        # so that the other ranks leave its steps and load the new one before the split.
        self.tensor_parallel_switch: Callable[[LoadedModel], None] | None = None
        # Called after every engine iteration: sinks may buffer events until then (one hand-off
        # to the event loop per step instead of one per token).
        self._flush_events = flush_events or (lambda: None)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._current: LoadedModel | None = None
        self._batch: Batch | None = None
        # Whether the batch may have deferred work (``Batch.capture_deferred``) left.
        self._captures_left = False
        self._switching = False  # a swap is being prepared outside the lock
        self._pending: tuple[LoadedModel, concurrent.futures.Future[LoadedModel | None]] | None = (
            None
        )
        # The pending swap's batch is warmed up here before it goes live (``swap``).
        self._warm_pending = False
        # Seconds of the last warm-up this engine ran.
        self.warmup_seconds = 0.0
        self._abort: str | None = None
        self._stopping = False
        self._forward_passes = 0
        # Liveness: monotonic time of the loop's last sign of progress (engine thread writes).
        self._heartbeat = time.monotonic()
        # Fault injection: a pending wedge (seconds, and a future done once the loop is
        # blocked), and the event that ends a wedge early (stop()).
        self._wedge: tuple[float, concurrent.futures.Future[None]] | None = None
        self._unwedge = threading.Event()
        # A requested profile of the next forward passes (``profile``): engine thread only, once
        # taken from the API side under the lock.
        self._profile: PassProfile | None = None
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
    def batch_slots(self) -> int:
        """Most sequences the current batch runs at once: ``max_batch_size``, or fewer where
        the device's memory holds fewer in the static KV cache (``StaticDecoder._fit``)."""
        batch = self._batch
        return batch.decoder.slots if isinstance(batch, StaticBatch) else self.max_batch_size

    @property
    def modeling(self) -> str | None:
        """Whose modules run the current model: metalserve's or transformers' (those of a
        model whose static path could not run: ``_new_batch``)."""
        model = self._current
        return model.modeling if model is not None else None

    @property
    def decode_compiled(self) -> bool:
        """Whether the current model's decode layer runs compiled (torch.compile)."""
        batch = self._batch
        return isinstance(batch, StaticBatch) and batch.decoder.compiled

    @property
    def decode_gemm_tuning(self) -> list[dict[str, Any]]:
        """What the current model's decode projections were timed at, and which ran the
        kernel (``staticdecode``'s ``gemm_tuning``; empty where nothing was tuned)."""
        batch = self._batch
        return batch.decoder.gemm_tuning if isinstance(batch, StaticBatch) else []

    @property
    def prefix_cache_tokens_held(self) -> int:
        """Prompt tokens the current model's prefix cache holds at most (0: it has none: the
        dynamic path, off, or no device memory for it)."""
        batch = self._batch
        if isinstance(batch, StaticBatch) and batch.decoder.prefix is not None:
            return batch.decoder.prefix.blocks * batch.decoder.prefix.block_tokens
        return 0

    @property
    def weight_bytes(self) -> int | None:
        """Device bytes of the current model's weights as served (FP8 projections counted)."""
        batch = self._batch
        if isinstance(batch, StaticBatch):
            return batch.decoder.weight_bytes
        model = self._current
        if batch is None or model is None:
            return None
        return sum(p.numel() * p.element_size() for p in model.model.parameters())

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

    def dump_stacks(self) -> None:
        """Every thread's stack to stderr (the journal), the engine's among them: where a
        stalled loop is stuck."""
        faulthandler.dump_traceback(all_threads=True)

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
            self._report_state()
            self._cond.notify_all()

    def cancel(self, seq: Sequence) -> None:
        """The client went away: the engine drops ``seq`` at its next step."""
        seq.cancel()

    def swap(
        self, bundle: LoadedModel, *, warm_up: bool = False
    ) -> concurrent.futures.Future[LoadedModel | None]:
        """Switch to ``bundle`` between steps; the future yields the replaced model (or None).
        ``warm_up``: prove the batch it goes live with generates first (``_warm_up``)."""
        future: concurrent.futures.Future[LoadedModel | None] = concurrent.futures.Future()
        with self._cond:
            if self._pending is not None:
                raise RuntimeError("a model swap is already pending")
            self._pending = (bundle, future)
            self._warm_pending = warm_up
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

    def profile(
        self, passes: int, max_seconds: float, directory: Path, *, python: bool = False
    ) -> PassProfile:
        """Record the next ``passes`` forward passes (or ``max_seconds`` of them) with
        torch.profiler into ``directory`` (``python``: Python's calls too); the profile's future
        has its summary (``metalserve.engine.profiling``)."""
        profile = PassProfile(passes, max_seconds, directory, python=python)
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                raise RuntimeError("the engine is not running")
            if self._profile is not None:
                raise RuntimeError("a profile is already being recorded")
            self._profile = profile
            self._cond.notify_all()
        return profile

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
                profile, self._profile = self._profile, None
            if profile is not None:
                with contextlib.suppress(Exception):  # the rest of the stop must still run
                    profile.end("the engine stopped before a forward pass ran")
            self._flush_events()
            self._stop_other_ranks()

    def _stop_other_ranks(self) -> None:
        """Tensor parallelism: end the other ranks' steps (they exit)."""
        if self.tensor_parallel is None or not isinstance(self._batch, StaticBatch):
            return
        try:
            self._batch.decoder.stop_followers()
        except Exception:
            log.exception("stopping the other ranks failed (they die with this process)")

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
                    idle = incoming is None and not admitted and not self._batch
                    if idle:
                        self._end_profile_if(
                            self._profile is not None and self._profile.expired(),
                        )
                        # The batch's deferred work, if any, now; not under a profile (its
                        # passes are the served ones, as a switch ends it before capturing).
                        if not self._captures_left or self._profile is not None:
                            # Bounded: the heartbeat must advance while idle.
                            self._cond.wait(timeout=self.idle_wait)
                            continue
                if idle:
                    # Outside the lock: a submission waits for this one capture.
                    assert self._batch is not None
                    try:
                        self._captures_left = self._batch.capture_deferred()
                    except Exception:  # the batch serves without it: not the engine's end
                        log.exception("the batch's deferred work failed; none is tried again")
                        self._captures_left = False
                    if self.observer is not None:
                        left = self._batch.deferred_count() if self._captures_left else 0
                        self.observer.deferred_graphs(left)
                    continue
                if incoming is not None:
                    # A profile in progress ends before the switch's compiling and capturing.
                    self._end_profile_if(self._profile is not None and self._profile.began)
                    if not self._switch(*incoming):
                        return
                    continue
                try:
                    self._profiled_step(admitted)
                    self._report_state()
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
                    if self.tensor_parallel is not None:
                        # The other ranks may be inside the failed step's collectives, or past
                        # it: no later step would meet theirs. The replica restarts whole.
                        log.critical("a failed step leaves the other ranks out of step: stop")
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

    def _profiled_step(self, admitted: list[Sequence]) -> None:
        """``_step``, recorded while a profile asks for it."""
        profile, batch = self._profile, self._batch
        if profile is None or batch is None:
            self._step(admitted)
            return
        assert self._current is not None
        try:
            profile.begin(self._current.device)
        except Exception as exc:  # the profiler's fault: the step runs unprofiled
            log.exception("the engine profile could not start")
            self._profile = None
            profile.fail(exc)
            self._step(admitted)
            return
        before = batch.forward_passes
        try:
            self._step(admitted)
        finally:
            passes = batch.forward_passes - before
            prefill = min(passes, int(bool(admitted)))
            self._end_profile_if(profile.count(prefill=prefill, decode=passes - prefill))

    def _end_profile_if(self, done: bool) -> None:
        """End the profile (``done``); its failures are its caller's, never the engine's."""
        if done and self._profile is not None:
            profile, self._profile = self._profile, None
            try:
                profile.end(f"no forward pass ran within {profile.max_seconds:g} s")
            except Exception:
                log.exception("the engine profile could not end")

    def _admit(self) -> list[Sequence]:
        """Pop the sequences that can start now (FIFO, only those prepared for this model)."""
        if self._current is None or self._batch is None:
            return []
        room = self.batch_slots - len(self._batch)
        admitted: list[Sequence] = []
        kept: deque[Sequence] = deque()
        while self._waiting:
            seq = self._waiting.popleft()
            if seq.cancelled:
                seq.fail(499, "client went away", self.observer)
            elif seq.bundle is self._current and len(admitted) < room:
                admitted.append(seq)
                seq.admitted_at = time.monotonic()
                if self.observer is not None:
                    self.observer.request_queued(seq.admitted_at - seq.created_at)
            elif seq.bundle is self._current or (
                self._pending is not None and seq.bundle is self._pending[0]
            ):
                kept.append(seq)
            else:  # unreachable: submit() refuses stale sequences, swaps wait for queued ones
                seq.fail(503, "the model was replaced; retry", self.observer)
        self._waiting = kept
        self._report_state()
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
    ) -> bool:
        """Make ``bundle`` the live model (False: it could not, and the engine must stop)."""
        with self._beating(SWITCH_DEADLINE_SECONDS):
            try:
                old = self._current
                if self.release_replaced and old is not None and old is not bundle:
                    # Its batch is gone (``_swap_due``): nothing can run it any more.
                    old.release_weights()
                batch = self._new_batch(bundle)
                if self._warm_pending or self.tensor_parallel is not None:
                    self._warm_up(bundle, batch)
            except Exception as exc:  # noqa: BLE001 - any cause: the caller gets it
                # The old batch is gone: the engine stops, and the swap's caller learns why.
                log.critical("the new model cannot go live, the engine stops: %s", exc)
                with self._cond:
                    self._pending, self._switching = None, False
                if not future.cancelled():  # the caller gave up (the server shuts down)
                    future.set_exception(exc)
                return False
        with self._cond:
            old = self._current
            self._current, self._batch, self._pending = bundle, batch, None
            self._captures_left = True  # whatever its start left for idle moments
            self._switching = False
            log.info("now serving version %s", bundle.short_id)
            if not future.cancelled():
                future.set_result(old)
            self._cond.notify_all()
        if self.observer is not None:
            self.observer.deferred_graphs(batch.deferred_count())
        return True

    def _warm_up(self, bundle: LoadedModel, batch: Batch) -> None:
        """Prove ``batch`` generates (greedy, ``WARMUP_TOKENS``) before it goes live: a first
        version's warm-up (nothing served beside it: the batch it serves with, its graphs
        replayed, instead of a one-sequence batch of its own before) and every version's over
        tensor-parallel ranks (each rank holds its part of the model only, so nothing can run
        it whole before; the tests compare with one rank). Its tokens are not served ones."""
        started = time.monotonic()
        observer, passes = batch.observer, batch.forward_passes
        batch.observer = None
        try:
            prompt = warmup_prompt(bundle)
            params = SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True)
            text = generate_once(bundle, prompt, params, self.step_delay, batch)
        finally:
            batch.observer, batch.forward_passes = observer, passes
        self.warmup_seconds = time.monotonic() - started
        log.info("warm-up of %s passed on its batch: %r", bundle.short_id, text)

    @contextlib.contextmanager
    def _beating(self, deadline: float) -> Iterator[None]:
        """Advance the heartbeat every second while the block runs, for at most ``deadline``
        seconds: a switch that takes longer stops it, and the watchdog restarts the replica."""
        done = threading.Event()

        def beat() -> None:
            ends = time.monotonic() + deadline
            while not done.wait(1.0):
                if time.monotonic() > ends:
                    log.error("preparing the new model's batch exceeded %.0fs", deadline)
                    return
                self._beat()

        self._beat()
        keeper = threading.Thread(target=beat, name="switch-heartbeat", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            done.set()
            keeper.join()
            self._beat()

    def _new_batch(self, bundle: LoadedModel) -> Batch:
        """The batch of a model on the decode path ``decode_mode`` asks for and the model and
        device allow (``auto``: CUDA graphs on CUDA, the dynamic path elsewhere)."""
        import torch

        if bundle.device.type == "cuda" and bundle.device.index is not None:
            # This thread's CUDA work (graph replays, events, its current stream) on the model's
            # device: with cuda:N it would otherwise go to cuda:0.
            torch.cuda.set_device(bundle.device)
        if self.tensor_parallel is not None:
            return self._tensor_parallel_batch(bundle, self.tensor_parallel)
        mode, compiled = self.decode_path_on(bundle.device.type)
        # A model built for the static path alone (``llama_family``) has no dynamic path.
        static_only = static_path_only(bundle.model)
        if mode == "dynamic" and static_only:
            mode = "static"
        if mode == "dynamic":
            return DynamicBatch(bundle, self.observer)
        if mode == "static" and self.decode_mode == "cuda-graphs":
            log.warning("decode mode cuda-graphs needs a CUDA device; using the static path")
        from metalserve import staticdecode

        # Tried in turn: the mode asked for; for a model of the static path alone, that path
        # eager (a failed capture or compilation costs it its graphs, not its path).
        tries = [(mode, compiled)]
        if static_only and (mode, compiled) != ("static", False):
            tries.append(("static", False))
        failure, no_room = "", False
        for mode, compiled in tries:
            if failure:
                log.warning("%s; trying the static path, eager", failure)
            try:
                return self._static_batch(bundle, mode, compiled)
            except Exception as exc:
                if self.quantization != "none":  # no fallback: the dynamic path serves others
                    raise LoadError(f"quantization {self.quantization}: {exc}") from exc
                no_room = isinstance(
                    exc, (staticdecode.StaticDecodeUnavailable, torch.OutOfMemoryError)
                )
                if isinstance(exc, staticdecode.StaticDecodeUnavailable):
                    failure = f"decode mode {mode} unavailable ({exc})"
                else:
                    log.exception("preparing decode mode %s failed", mode)
                    failure = f"decode mode {mode} failed ({exc})"
            # Here, past the handler: the exception's frames held the failed decoder (its
            # cache, its graphs and fused weights), which must be gone before the next one
            # sizes its cache or the dynamic path allocates.
            gc.collect()
        if not static_only:
            log.warning("%s; using the dynamic path", failure)
            return DynamicBatch(bundle, self.observer)
        if not no_room:  # a fault, not the device's size: nothing else to try
            raise LoadError(f"the static decode path failed: {failure}")
        # Where not one sequence of the context fits the static cache, say: transformers'
        # modules run the same tensors on the dynamic path (its cache grows as it goes),
        # proven here (a hot reload warmed up the static path, not these).
        log.warning("%s; transformers' modules on the dynamic path", failure)
        bundle.use_transformers_modules()
        batch = DynamicBatch(bundle, self.observer)
        self._warm_up(bundle, batch)
        return batch

    def _static_batch(self, bundle: LoadedModel, mode: str, compiled: bool) -> Batch:
        """A batch on the static path, its graphs captured where ``mode`` is cuda-graphs."""
        from metalserve import staticdecode

        quantized = self.quantization != "none"
        decoder = staticdecode.StaticDecoder(
            bundle.model,
            slots=self.max_batch_size,
            max_length=bundle.max_context,
            device=bundle.device,
            dtype=bundle.dtype,
            cuda_graphs=mode == "cuda-graphs",
            compile_layers=compiled,
            quantization=self.quantization,
            attention=self.decode_attention,
            gemm=self.decode_gemm,
            prefix_cache_tokens=self.prefix_cache_tokens,
            reserve_bytes=self._reserve(bundle),
        )
        # Most graphs are captured after the switch, while idle (``_loop``): the 32 prefill
        # captures were 1.0 s of an 8B start's switch on an H100 (BENCHMARKS round 2 step 30),
        # the decode graphs but the largest 0.4-0.6 s (step 34).
        try:
            decoder.capture_all(defer=True)
        except Exception:
            if not (decoder.compiled or decoder.fused):
                raise
            what = "compiling the decode layer" if decoder.compiled else "its fused kernels"
            log.exception("%s failed; plain torch runs the layer", what)
            decoder.use_eager_layers()
            decoder.capture_all(defer=True)
        log.info(
            "decode path: %s%s%s, %d slots of %d tokens, weights %.2f GiB, prefix cache %s",
            mode,
            ", compiled" if decoder.compiled else ", fused kernels" if decoder.fused else "",
            f", {self.quantization} weights" if quantized else "",
            decoder.slots,
            decoder.max_length,
            decoder.weight_bytes / 2**30,
            f"{decoder.prefix_cache_bytes / 2**30:.2f} GiB" if decoder.prefix else "off",
        )
        return StaticBatch(bundle, decoder, self.observer)

    def decode_path_on(self, device_type: str) -> tuple[str, bool]:
        """The decode path ``decode_mode`` gives on a device of ``device_type`` (``auto``: CUDA
        graphs on CUDA, the dynamic path elsewhere; quantized weights: the static path), and
        whether its layer runs compiled."""
        mode = self.decode_mode
        on_cuda = device_type == "cuda"
        if mode == "auto":
            # Quantized weights exist on the static path only (eager on the CPU).
            quantized = self.quantization != "none"
            mode = "cuda-graphs" if on_cuda else "static" if quantized else "dynamic"
        if mode == "cuda-graphs" and not on_cuda:
            mode = "static"
        if mode == "dynamic" or self.decode_compile != "auto":
            return mode, self.decode_compile == "on" and mode != "dynamic"
        # auto: with graphs, the layer's elementwise steps fused by ``layer_kernels`` (a step as
        # fast, without the compiler's seconds at start), or compiled where those cannot run.
        from metalserve import layer_kernels

        return mode, mode == "cuda-graphs" and not layer_kernels.triton_available()

    def _tensor_parallel_batch(self, bundle: LoadedModel, tp: TensorParallel) -> Batch:
        """The static path split over the replica's ranks (every rank captures its graphs and
        compiles its layer alike); ``_switch`` warms it up, the ranks together."""
        from metalserve import ranks, staticdecode

        if self._current is not None and self.tensor_parallel_switch is not None:
            self.tensor_parallel_switch(bundle)
        try:
            decoder = ranks.split_decoder(
                bundle,
                self.max_batch_size,
                tp,
                quantization=self.quantization,
                decode_mode=self.decode_mode,
                decode_compile=self.decode_compile,
                decode_attention=self.decode_attention,
                decode_gemm=self.decode_gemm,
                prefix_cache_tokens=self.prefix_cache_tokens,
                # Only rank 0 loads the next version beside the live one (the other ranks
                # free theirs first, ``ranks.follow``).
                reserve_bytes=self._reserve(bundle),
            )
        except staticdecode.StaticDecodeUnavailable as exc:
            raise LoadError(f"tensor parallelism over {tp.world} ranks: {exc}") from exc
        log.info(
            "decode path: static over %d ranks, weights %.2f GiB on this one",
            tp.world,
            decoder.weight_bytes / 2**30,
        )
        return StaticBatch(bundle, decoder, self.observer)

    def _reserve(self, bundle: LoadedModel) -> int:
        """Device bytes the static cache leaves free: a next version of ``bundle``'s size where
        hot reloads may load one."""
        return bundle.loaded_bytes if self.reload_headroom else 0

    def _fail_batch(self, status: int, message: str) -> None:
        if self._batch is not None:
            for seq in self._batch.seqs:
                seq.fail(status, message, self.observer)
            self._batch.clear()

    def _fail_everything(self, status: int, message: str) -> None:
        self._fail_batch(status, message)
        while self._waiting:
            self._waiting.popleft().fail(status, message, self.observer)
        self._report_state()

    def _report_state(self) -> None:
        """Running and waiting sequences, and the share of the batch's token capacity (slots x
        context) their prompts and outputs take (what the static KV cache holds)."""
        if self.observer is None:
            return
        batch, model = self._batch, self._current
        seqs = batch.seqs if batch is not None else []
        capacity = self.batch_slots * model.max_context if model is not None else 0
        used = sum(len(seq.prompt_ids) + len(seq.generated) for seq in seqs)
        usage = used / capacity if capacity else 0.0
        self.observer.engine_state(len(seqs), len(self._waiting), usage)
