"""The model side of a replica: the engine, loading versions (through the node's cache,
verified) and the other ranks of a tensor-parallel replica. The API's ``Replica`` holds one, or,
with the engine in a process of its own (``--engine-process``), a ``metalserve.core`` client of
one that runs there.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

from metalserve import ranks, store
from metalserve.cache import Lease, VersionCache
from metalserve.engine import (
    WARMUP_TOKENS,
    Engine,
    EngineObserver,
    generate_once,
    warmup_prompt,
)
from metalserve.loader import (
    LoadedModel,
    LoadError,
    ModelView,
    import_libraries,
    load_version,
)
from metalserve.sampling import SamplingParams
from metalserve.settings import ServeSettings
from metalserve.threads import in_daemon_thread

# As when this was part of replica.py: its log lines keep their logger name.
log = logging.getLogger("metalserve.replica")

LOAD_THREAD = "metalserve-load"
# Told of a version once it is loaded and verified, before its warm-up (on the load's thread).
OnLoaded = Callable[[ModelView], None]


class HostObserver(EngineObserver, Protocol):
    """What the host reports: the engine's observations and its loads' use of the node cache
    (``metalserve.metrics.Metrics``; in the engine's process a relay of them to the API's)."""

    def cache_load(self, result: str) -> None: ...


class ModelHost:
    """Loads versions and runs them in the engine: a start's first, a hot reload's next."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: HostObserver,
        *,
        flush_events: Callable[[], None],
        reload_headroom: bool,
        on_rank_failure: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.on_rank_failure = on_rank_failure
        self.engine = Engine(
            max_batch_size=settings.batch_limit,
            max_queue=settings.max_queue,
            observer=metrics,
            step_delay=settings.debug_step_delay,
            decode_mode=settings.decode_mode,
            decode_compile=settings.decode_compile,
            decode_attention=settings.decode_attention,
            decode_gemm=settings.decode_gemm,
            prefix_cache_tokens=settings.prefix_cache_tokens,
            quantization=settings.quantization,
            flush_events=flush_events,
            reload_headroom=reload_headroom,
            release_replaced=True,
        )
        self.cache = (
            VersionCache(settings.cache_dir, int(settings.cache_max_gib * 2**30))
            if settings.cache_dir is not None
            else None
        )
        # The cache lease of the version served (kept: no eviction removes it) and of one loading.
        self._leases: dict[str, Lease] = {}
        # serve --tensor-parallel: the other ranks, and what each rank loaded (rank order).
        self.ranks: ranks.Ranks | None = None
        # Rank 0's process group, once the other ranks joined it (``_share_with_ranks``).
        self._group: Future[Any] | None = None
        self.rank_infos: list[dict[str, Any]] = []
        self._loaded_from: dict[str, Path] = {}

    async def start(
        self, version_id: str, timings: dict[str, float], loaded: OnLoaded | None = None
    ) -> LoadedModel:
        """Load, verify and warm up the first version and make it the engine's (``timings``
        gets the seconds of each part; ``loaded`` is told of it once loaded, before the
        warm-up)."""
        if self.settings.tensor_parallel > 1:
            self._start_ranks()
        # Warmed up by the engine on the batch it goes live with (``Engine._warm_up``).
        bundle = await in_daemon_thread(
            LOAD_THREAD, self.load_and_warm, version_id, timings, False, loaded
        )
        if self.settings.tensor_parallel > 1:
            started = time.monotonic()
            await in_daemon_thread(LOAD_THREAD, self._join_ranks, bundle)
            timings["ranks"] = time.monotonic() - started
        switching = time.monotonic()
        await asyncio.wrap_future(self.engine.swap(bundle, warm_up=True))
        timings["warmup"] = self.engine.warmup_seconds
        timings["decode_path"] = time.monotonic() - switching - timings["warmup"]
        return bundle

    async def load_next(self, version_id: str, loaded: OnLoaded | None = None) -> LoadedModel:
        """A hot reload's first half: the next version loaded, verified and warmed up beside
        the one served (``loaded``: as ``start``'s)."""
        return await in_daemon_thread(
            LOAD_THREAD, self.load_and_warm, version_id, None, True, loaded
        )

    async def swap_in(self, bundle: ModelView) -> str | None:
        """A hot reload's second half: ``bundle`` (what ``load_next`` returned) served once the
        engine switched to it; the replaced version's cache lease and memory given back. The
        replaced version's id."""
        assert isinstance(bundle, LoadedModel), "a version this host loaded"
        return await self.settle_swap(bundle, self.engine.swap(bundle))

    async def settle_swap(
        self, bundle: LoadedModel, swapping: Future[LoadedModel | None]
    ) -> str | None:
        """``swap_in`` once ``Engine.swap`` was asked (``swapping``)."""
        old = await asyncio.wrap_future(swapping)
        self.release_leases(keep=bundle.version_id)
        previous = old.version_id if old is not None else None
        del old
        _free_memory(bundle)
        return previous

    def load_and_warm(
        self,
        version_id: str,
        timings: dict[str, float] | None = None,
        warm_up: bool = True,
        loaded: OnLoaded | None = None,
    ) -> LoadedModel:
        """Load and verify a version (from the node's cache when it holds it), then, with
        ``warm_up``, prove it generates (blocking: run in a thread). ``timings`` gets the
        seconds of each part; ``loaded`` is told of the version once loaded."""
        timings = {} if timings is None else timings
        started = time.monotonic()
        import_libraries()
        # Added to: an engine's process counts its own imports before the call here.
        timings["imports"] = timings.get("imports", 0.0) + time.monotonic() - started
        if self.settings.decode_tuning_file is not None:
            from metalserve import skinny_linear

            skinny_linear.remember_in(self.settings.decode_tuning_file)
        bundle = self._load(version_id)
        timings["load"] = bundle.load_seconds
        if loaded is not None:
            loaded(bundle)
        if bundle.part_of is not None and self.engine.tensor_parallel is not None:
            self._verify_version(version_id)
        if bundle.part_of is not None or not warm_up:
            # A rank's part runs only with the other ranks: the engine warms them up together.
            return bundle
        started = time.monotonic()
        text = generate_once(
            bundle,
            warmup_prompt(bundle),
            SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True),
            step_delay=self.settings.debug_step_delay,
        )
        timings["warmup"] = time.monotonic() - started
        log.info("warm-up of %s passed: %r", bundle.short_id, text)
        return bundle

    def _verify_version(self, version_id: str) -> None:
        """A hot reload over tensor-parallel ranks: the other ranks drop the version they serve
        before they load their parts of the next, so every block of it is verified here first
        (host threads), and a bad version is refused while the old one still serves. A bad
        copy in the node's cache is dropped: the next attempt loads the store's."""
        root = self._loaded_from[version_id]
        model = self.settings.model
        entries = store.read_manifest(root, model, version_id).files
        problems = store.verify_files(store.version_dir(root, model, version_id), entries)
        if problems:
            if root != self.settings.store:
                self._drop_cached(version_id)
            raise store.VerificationError(version_id, problems)

    def _drop_cached(self, version_id: str) -> None:
        """The node cache's copy of ``version_id`` failed verification: give it up."""
        lease = self._leases.pop(version_id, None)
        if lease is not None:
            lease.release()
        if self.cache is not None:
            self.cache.drop(self.settings.model, version_id)
        self.metrics.cache_load("corrupt")
        log.error("dropped the node cache's copy of %s", version_id[: store.SHORT_ID_LEN])

    def _load(self, version_id: str) -> LoadedModel:
        settings = self.settings

        part = None
        if settings.tensor_parallel > 1:
            from metalserve.tensor_parallel import TensorParallel

            part = TensorParallel(0, settings.tensor_parallel)

        # Where the engine runs the model on the static path (CUDA by default), the loader
        # may build it without transformers' modeling code (``metalserve.llama_family``).
        device_type = settings.device.partition(":")[0]
        static_only = (
            settings.modeling == "auto"
            and part is None
            and self.engine.decode_path_on(device_type)[0] != "dynamic"
        )

        def load_from(root: Path) -> LoadedModel:
            return load_version(
                root,
                settings.model,
                version_id,
                device=settings.device,
                dtype=settings.dtype,
                chunk_size=settings.read_chunk_mib * 1024 * 1024,
                tensor_parallel=part,
                max_context=settings.max_context,
                static_only=static_only,
            )

        cache = self.cache
        lease = cache.acquire(settings.model, version_id) if cache is not None else None
        if self.ranks is not None and self._group is None:
            # The first load: the other ranks load their parts beside this one.
            self._share_with_ranks(lease.root if lease is not None else settings.store, version_id)
        if cache is not None and lease is not None:
            try:
                bundle = load_from(lease.root)
                self._loaded_from[version_id] = lease.root
            except store.VerificationError as exc:
                # Never served: dropped, then the store's copy is loaded (and cached again).
                log.error("the cached copy failed verification: %s", exc)
                lease.release()
                self._drop_cached(version_id)
            else:
                self._leases[version_id] = lease
                self.metrics.cache_load("hit")
                log.info("loaded %s from the node's cache", version_id[: store.SHORT_ID_LEN])
                return bundle
        bundle = load_from(settings.store)
        self._loaded_from[version_id] = settings.store
        if cache is not None:
            self.metrics.cache_load("miss")
            threading.Thread(
                target=self._cache_version,
                args=(cache, version_id),
                name="metalserve-cache",
                daemon=True,
            ).start()
        return bundle

    def _cache_version(self, cache: VersionCache, version_id: str) -> None:
        """Copy a version just loaded from the store into the cache (a background thread: the
        load never waits for it), then hold its lease while it is served."""
        try:
            if not cache.add(self.settings.store, self.settings.model, version_id):
                return
        except Exception:
            log.exception("caching %s failed", version_id[: store.SHORT_ID_LEN])
            return
        lease = cache.acquire(self.settings.model, version_id)
        if lease is not None:
            self._leases[version_id] = lease  # released when another version replaces it
        log.info("cached %s on this node", version_id[: store.SHORT_ID_LEN])

    def release_leases(self, keep: str | None) -> None:
        """Release the cache leases of every version but ``keep`` (the one served)."""
        for version_id in [v for v in self._leases if v != keep]:
            self._leases.pop(version_id).release()

    def _start_ranks(self) -> None:
        """Rank 0: start the other ranks now (their imports overlap this one's load); they wait
        for its version. A rank that exits from now on fails the replica."""
        settings = self.settings
        self.ranks = ranks.Ranks.start(
            settings.tensor_parallel,
            model=settings.model,
            device=settings.device,
            dtype=settings.dtype,
            chunk_size=settings.read_chunk_mib * 1024 * 1024,
            slots=settings.batch_limit,
            max_context=settings.max_context,
            store=str(settings.store),
            quantization=settings.quantization,
            decode_mode=settings.decode_mode,
            decode_compile=settings.decode_compile,
            decode_attention=settings.decode_attention,
            decode_gemm=settings.decode_gemm,
            prefix_cache_tokens=settings.prefix_cache_tokens,
            decode_tuning_file=settings.decode_tuning_file,
            log_level=settings.log_level,
        )
        self.ranks.watch(self.on_rank_failure)

    def _share_with_ranks(self, root: Path, version_id: str) -> None:
        """Rank 0's first load: on a thread of its own (the other ranks may still be importing),
        join their group and send them the version and the root this rank loads it from, so
        that they load their parts while this one loads its own (each verifies its own part;
        one whose part of the node cache's copy is bad loads the store's)."""
        assert self.ranks is not None
        spec = self.ranks.spec
        self._group = Future()

        def share(group: Future[Any] = self._group) -> None:
            try:
                tp = ranks.join_group(spec, 0)
                ranks.share_version(str(root), version_id)
            except BaseException as exc:  # noqa: BLE001 - raised in the loading thread
                group.set_exception(exc)
            else:
                group.set_result(tp)

        threading.Thread(target=share, name="metalserve-ranks", daemon=True).start()

    def _join_ranks(self, bundle: LoadedModel) -> None:
        """Rank 0, its version loaded: wait until every other rank has loaded and split it
        (blocking), then run the engine with them."""
        assert self._group is not None
        tp = self._group.result()
        self._check_ranks(bundle)
        self.engine.tensor_parallel = tp
        self.engine.tensor_parallel_switch = self._switch_ranks

    def _switch_ranks(self, bundle: LoadedModel) -> None:
        """Rank 0, on the engine's thread during a hot reload (the old version's requests done,
        new ones waiting): the other ranks drop the old version, then load and split this one."""
        assert self.engine.tensor_parallel is not None
        root = str(self._loaded_from[bundle.version_id])
        ranks.announce_reload(self.engine.tensor_parallel, bundle.device, root, bundle.version_id)
        self._check_ranks(bundle)

    def _check_ranks(self, bundle: LoadedModel) -> None:
        """Wait until every rank has loaded and split ``bundle``'s version; keep what each says."""
        world = self.settings.tensor_parallel
        self.rank_infos = ranks.exchange(ranks.rank_info(0, bundle), world)
        mismatched = [i for i in self.rank_infos if i["version_id"] != bundle.version_id]
        if mismatched:
            raise LoadError(f"ranks loaded other versions than {bundle.short_id}: {mismatched}")
        if any(info["cache_copy_failed"] for info in self.rank_infos):
            # A rank found its part of the cached copy bad and loaded the store's instead.
            self._drop_cached(bundle.version_id)
        log.info("every rank of %d loaded %s", world, bundle.short_id)

    def stop_ranks(self) -> None:
        """After the engine stopped (which ends the other ranks' steps): wait for them."""
        if self.ranks is not None:
            self.ranks.stop()


def _free_memory(bundle: LoadedModel) -> None:
    """Return the replaced model's memory (on GPUs the caching allocator keeps it otherwise).
    Unfrozen first: objects that ``freeze_heap`` froze are never collected; frozen again
    right after this one collection (not a second one from the server's freeze)."""
    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
    if bundle.device.type == "cuda":
        import torch

        from metalserve.staticdecode import CAPTURING

        with CAPTURING:  # not while the engine thread captures a deferred graph
            torch.cuda.empty_cache()


def freeze_heap(collect: bool = True) -> None:
    """Once ready (a reload unfreezes to free the old model, then freezes again): every
    object alive now (torch, transformers, the compiler's: millions) moves to the permanent
    generation, which collections skip. A full collection over them stopped every thread,
    the engine's included, for hundreds of milliseconds at random moments: the time-to-first-
    token tail. vLLM freezes its heap after start-up for the same reason. ``collect``: a full
    collection first, so that no garbage is frozen with them (without: the freeze alone,
    constant time; what garbage it keeps goes at the next reload's collection)."""
    started = time.perf_counter()
    if collect:
        gc.collect()
    gc.freeze()
    log.info(
        "froze %d objects out of garbage collection in %.2fs",
        gc.get_freeze_count(),
        time.perf_counter() - started,
    )
