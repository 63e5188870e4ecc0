"""Prometheus metrics of one replica, in a registry of its own (one per app instance)."""

from __future__ import annotations

import contextlib
import gc
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A decode step of a small model on a GPU takes ~2 ms, of an 8B model ~5-10 ms, on a CPU more.
_STEP_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)


class GcTimer:
    """Times this process's garbage collections (``gc.callbacks``) for ``record``."""

    def __init__(self, record: Callable[[int, float], None]) -> None:
        self._record = record
        self._started = 0.0

    def watch(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        # Collections do not overlap (they hold the GIL): one start time is enough.
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._record(info["generation"], time.perf_counter() - self._started)


class GcPauses:
    """``metalserve_gc_pause_seconds``, recorded without a lock. A collection starts at any
    allocation of any thread, one inside prometheus_client's (non-reentrant) metric locks too:
    a callback that took such a lock there would wait for itself forever (the reader thread of
    the engine's messages did, and with it every scrape and the watchdog's heartbeats). So
    ``record`` only appends to a deque, and each scrape moves what it holds into the histogram
    (the deque keeps the last ``PENDING`` collections: a replica nobody scrapes stays bounded)."""

    PENDING = 65536

    def __init__(self, registry: CollectorRegistry) -> None:
        self._pending: deque[tuple[int, float]] = deque(maxlen=self.PENDING)
        self._histogram = Histogram(
            "metalserve_gc_pause_seconds",
            "Python garbage collections by generation (each stops every thread of the replica, "
            "the engine's included)",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=None,
        )
        registry.register(self)

    def record(self, generation: int, seconds: float) -> None:
        self._pending.append((generation, seconds))  # atomic: no lock, safe inside a collection

    def describe(self) -> Iterable[Metric]:
        return self._histogram.describe()

    def collect(self) -> Iterator[Metric]:
        while True:
            try:  # two scrapes may drain at once
                generation, seconds = self._pending.popleft()
            except IndexError:
                break
            self._histogram.labels(generation=str(generation)).observe(seconds)
        return iter(self._histogram.collect())


# Of another API process's gauges, those that add to the first one's (the others' readiness,
# version and engine state are the first one's own).
SUMMED_GAUGES = frozenset({"metalserve_in_flight_requests"})


class WithOtherProcesses(Collector):
    """A replica's metrics with its other API processes' (``serve --api-processes``): their
    counters and histograms (requests, latencies, the event loop's lag, collections) and their
    in-flight requests added to this process's, sample by sample, at each scrape."""

    def __init__(self, registry: CollectorRegistry, others: Callable[[], list[bytes]]) -> None:
        self.registry = registry
        self.others = others

    def collect(self) -> Iterator[Metric]:
        families = {family.name: family for family in self.registry.collect()}
        added: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for text in self.others():
            for family in text_string_to_metric_families(text.decode()):
                if family.name not in families or not (
                    family.type in ("counter", "histogram") or family.name in SUMMED_GAUGES
                ):
                    continue
                sums = added.setdefault(family.name, {})
                for sample in family.samples:
                    if not sample.name.endswith("_created"):
                        key = (sample.name, tuple(sorted(sample.labels.items())))
                        sums[key] = sums.get(key, 0.0) + sample.value
        for name, family in families.items():
            extra = added.get(name)
            if extra:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    value = sample.value + extra.pop(key, 0.0)
                    merged.samples.append(sample._replace(value=value))
                # Label sets only the others have (an endpoint, a status this one never saw).
                merged.samples += [Sample(n, dict(labels), v) for (n, labels), v in extra.items()]
                family = merged
            yield family


class Metrics:
    """All metrics of a replica; also the engine's observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # What scrapes read: the registry, or it with the other API processes' metrics.
        self.exposition = self.registry
        r = self.registry
        self._pass_children: dict[str, tuple[Any, Any, Any]] = {}
        self._part_children: dict[tuple[str, str], Any] = {}
        self.requests = Counter(
            "metalserve_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "metalserve_request_duration_seconds",
            "Time from request to last response byte",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "metalserve_time_to_first_token_seconds",
            "Time from submission to first token",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # What a client's TTFT is made of on the server: the engine's part is the histogram
        # above; the rest (parsing, tokenizing, handing the token to the event loop, framing
        # and writing it) is this one's minus that one's (label "completions" of both).
        self.time_to_first_byte = Histogram(
            "metalserve_time_to_first_byte_seconds",
            "Time from request to a streamed completion's first event written",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "metalserve_prompt_tokens", "Prompt tokens of finished sequences", registry=r
        )
        self.generated_tokens = Counter(
            "metalserve_generated_tokens", "Tokens generated", registry=r
        )
        self.sequences_finished = Counter(
            "metalserve_sequences_finished", "Sequences by how they ended", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "metalserve_batch_size",
            "Sequences per forward pass",
            ["phase"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.forward_passes = Counter(
            "metalserve_forward_passes", "Model forward passes", ["phase"], registry=r
        )
        self.forward_pass_duration = Histogram(
            "metalserve_forward_pass_duration_seconds",
            "Time of one forward pass, from its start to its tokens on the host",
            ["phase"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.forward_pass_parts = Histogram(
            "metalserve_forward_pass_part_seconds",
            "Where a forward pass's time goes: host (start to its last launch), host_cpu (the "
            "engine thread's CPU time in host: the rest it waited for the GIL or a core), wait "
            "(for its tokens on the host after that), device (CUDA: the device's time for the "
            "forward, a prefill's prefix-cache copies included), emit (its tokens to the "
            "sequences' text and events)",
            ["phase", "part"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        # Engine state, named after vLLM's metrics (vllm:num_requests_running, ...) so that
        # routers and autoscalers that read those read these.
        self.requests_running = Gauge(
            "metalserve_num_requests_running", "Sequences in the running batch", registry=r
        )
        self.requests_waiting = Gauge(
            "metalserve_num_requests_waiting", "Sequences waiting for a batch slot", registry=r
        )
        self.graphs_deferred = Gauge(
            "metalserve_deferred_graphs",
            "CUDA graphs of the serving version still to be captured, in the engine's idle "
            "moments (until then a larger batch bucket's graph or an eager prefill runs their "
            "steps)",
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            "metalserve_kv_cache_usage_perc",
            "Share (0 to 1) of the batch's token capacity, slots x context, that the running "
            "sequences' prompts and outputs take",
            registry=r,
        )
        self.request_queue_time = Histogram(
            "metalserve_request_queue_time_seconds",
            "Time from submission to a batch slot",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # As vLLM's vllm:prefix_cache_queries and vllm:prefix_cache_hits (in tokens): their
        # ratio is the hit rate.
        self.prefix_cache_queries = Counter(
            "metalserve_prefix_cache_queries",
            "Prompt tokens prefilled where the prefix cache is on",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "metalserve_prefix_cache_hits",
            "Prompt tokens whose keys and values came from the prefix cache (not computed)",
            registry=r,
        )
        self.in_flight = Gauge(
            "metalserve_in_flight_requests", "Inference requests being served", registry=r
        )
        self.ready = Gauge("metalserve_ready", "1 when /readyz answers 200", registry=r)
        self.draining = Gauge("metalserve_draining", "1 after SIGTERM", registry=r)
        self.model_info = Gauge(
            "metalserve_model_info",
            "The model version being served (always 1)",
            ["model", "version"],
            registry=r,
        )
        self.startup = Gauge(
            "metalserve_startup_seconds",
            "Where the time to ready went: process_start (the process's start to the load's: "
            "interpreter, server), imports (torch, transformers), load (verified weights on the "
            "device), warmup (a few greedy tokens, at a start on the batch that then serves), "
            "decode_path (the static cache, compiling, graph capture), ready "
            "(from the process's start, all of them)",
            ["phase"],
            registry=r,
        )
        self.reloads = Counter(
            "metalserve_reloads", "Hot reloads by result", ["result"], registry=r
        )
        self.cache_loads = Counter(
            "metalserve_cache_loads",
            "Loads with a node-local cache, by result: hit, miss (read the store), corrupt "
            "(the cached copy failed verification and was dropped; the store's was read)",
            ["result"],
            registry=r,
        )

        self.gc_pauses = GcPauses(r)
        self._gc_timer = GcTimer(self.gc_pause)
        # The HTTP side's backlog: every stream's events, every request's parsing and answer run
        # on one event loop thread; a loop behind its timers delays all of them (first tokens
        # of new requests included).
        self.event_loop_lag = Histogram(
            "metalserve_event_loop_lag_seconds",
            "How late the HTTP event loop ran its 0.1 s tick (ready work ahead of it)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        # A request's part of that backlog: from its head parsed (uvicorn's protocol) to the
        # API beginning to handle it.
        self.request_start_delay = Histogram(
            "metalserve_request_start_delay_seconds",
            "Time from a request's head read to its handling begun (the HTTP event loop's "
            "ready work ahead of it, or a pipelined connection's responses)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )

    def watch_gc(self) -> None:
        """Time every garbage collection of this process from now on (``gc.callbacks``)."""
        self._gc_timer.watch()

    def unwatch_gc(self) -> None:
        self._gc_timer.unwatch()

    def gc_pause(self, generation: int, seconds: float) -> None:
        """One collection (this process's, or the engine process's: ``metalserve.core``)."""
        self.gc_pauses.record(generation, seconds)

    def set_startup(self, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self.startup.labels(phase=phase).set(seconds)

    def set_model(self, model: str, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(model=model, version=version).set(1)

    def cache_load(self, result: str) -> None:
        self.cache_loads.labels(result=result).inc()

    def add_other_processes(self, others: Callable[[], list[bytes]]) -> None:
        """Scrapes read the other API processes' metrics too (``others``: their texts)."""
        self.exposition = CollectorRegistry(auto_describe=False)
        self.exposition.register(WithOtherProcesses(self.registry, others))

    def render(self) -> bytes:
        return generate_latest(self.exposition)

    # EngineObserver -------------------------------------------------------------------------

    def forward_pass(
        self, phase: str, batch_size: int, seconds: float, parts: dict[str, float]
    ) -> None:
        # Every pass, a decode step at 850M every millisecond: the labelled children are looked
        # up once (``labels()`` costs microseconds a call).
        children = self._pass_children.get(phase)
        if children is None:
            children = self._pass_children[phase] = (
                self.forward_passes.labels(phase=phase),
                self.batch_size.labels(phase=phase),
                self.forward_pass_duration.labels(phase=phase),
            )
        passes, batch, duration = children
        passes.inc()
        batch.observe(batch_size)
        duration.observe(seconds)
        for part, part_seconds in parts.items():
            child = self._part_children.get((phase, part))
            if child is None:
                child = self.forward_pass_parts.labels(phase=phase, part=part)
                self._part_children[phase, part] = child
            child.observe(part_seconds)

    def engine_state(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)
        self.kv_cache_usage.set(kv_cache_usage)

    def request_queued(self, seconds: float) -> None:
        self.request_queue_time.observe(seconds)

    def deferred_graphs(self, count: int) -> None:
        self.graphs_deferred.set(count)

    def prefix_cache(self, prompt_tokens: int, reused_tokens: int) -> None:
        self.prefix_cache_queries.inc(prompt_tokens)
        self.prefix_cache_hits.inc(reused_tokens)

    def first_token(self, endpoint: str, seconds: float) -> None:
        self.time_to_first_token.labels(endpoint=endpoint).observe(seconds)

    def sequence_finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.sequences_finished.labels(reason=reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(completion_tokens)
