"""One replica's state, shared by the routes, the background loader and the drain logic.

It decides when the replica may take traffic: loading, ready, failed or draining, with the
engine alive or not. Loads and warm-ups run on daemon threads so that SIGTERM never waits for them.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from metalserve import ranks, store
from metalserve.cache import Lease, VersionCache
from metalserve.engine import WARMUP_PROMPT, WARMUP_TOKENS, Engine, generate_once
from metalserve.errors import ApiError
from metalserve.exitcodes import ExitCode
from metalserve.loader import LoadedModel, LoadError, import_libraries, load_version
from metalserve.metrics import Metrics
from metalserve.relay import EventRelay
from metalserve.sampling import SamplingParams
from metalserve.settings import ServeSettings
from metalserve.threads import in_daemon_thread
from metalserve.tracing import Tracing

log = logging.getLogger(__name__)

LOAD_THREAD = "metalserve-load"


class Phase(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


def read_token(path: Path | None) -> str | None:
    """The admin bearer token kept in ``path``; None (no admin API) without a file."""
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"admin token file {path} is empty")
    return token


class Replica:
    """State shared by the routes, the background loader and the drain logic."""

    def __init__(self, settings: ServeSettings, version_id: str) -> None:
        self.settings = settings
        self.version_id = version_id
        self.metrics = Metrics()
        # Read at each scrape, on whichever listener serves it.
        self.metrics.ready.set_function(lambda: 1 if self.ready else 0)
        self.metrics.draining.set_function(lambda: 1 if self.draining else 0)
        self.relay = EventRelay()
        self.admin_token = read_token(settings.admin_token_file)
        self.engine = Engine(
            max_batch_size=settings.batch_limit,
            max_queue=settings.max_queue,
            observer=self.metrics,
            step_delay=settings.debug_step_delay,
            decode_mode=settings.decode_mode,
            decode_compile=settings.decode_compile,
            decode_attention=settings.decode_attention,
            decode_gemm=settings.decode_gemm,
            prefix_cache_tokens=settings.prefix_cache_tokens,
            quantization=settings.quantization,
            flush_events=self.relay.flush,
            # The admin API's hot reloads load the next version beside the live one.
            reload_headroom=self.admin_token is not None,
            release_replaced=True,
        )
        self.phase = Phase.LOADING
        self.draining = False
        self.exit_code = ExitCode.OK
        self.failure: str | None = None
        self.on_fatal: Callable[[], None] = lambda: None
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self.reload_lock = asyncio.Lock()
        self.cache = (
            VersionCache(settings.cache_dir, int(settings.cache_max_gib * 2**30))
            if settings.cache_dir is not None
            else None
        )
        self.tracing = (
            Tracing.otlp(
                settings.otlp_endpoint,
                {"metalserve.model": settings.model, "metalserve.port": str(settings.port)},
            )
            if settings.otlp_endpoint
            else None
        )
        # The cache lease of the version served (kept: no eviction removes it) and of one loading.
        self._leases: dict[str, Lease] = {}
        # Where the time to ready went (seconds by phase), once ready.
        self.startup: dict[str, float] = {}
        # serve --tensor-parallel: the other ranks, and what each rank loaded (rank order).
        self.ranks: ranks.Ranks | None = None
        # Rank 0's process group, once the other ranks joined it (``_share_with_ranks``).
        self._group: Future[Any] | None = None
        self.rank_infos: list[dict[str, Any]] = []
        self._loaded_from: dict[str, Path] = {}

    # --- state ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY and not self.draining and self.engine.is_alive()

    def state(self) -> str:
        if self.draining:
            return "draining"
        if not self.engine.is_alive():
            return "engine-dead"
        return self.phase.value

    def enter(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        self._idle_event().clear()

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0:
            self._idle_event().set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no inference request is in flight; False on timeout."""
        if self.in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle_event().wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if self.in_flight == 0:
                self._idle.set()
        return self._idle

    # --- loading --------------------------------------------------------------------------

    def load_and_warm(
        self, version_id: str, timings: dict[str, float] | None = None
    ) -> LoadedModel:
        """Load and verify a version (from the node's cache when it holds it), then prove it
        generates (blocking: run in a thread). ``timings`` gets the seconds of each part."""
        timings = {} if timings is None else timings
        started = time.monotonic()
        import_libraries()
        timings["imports"] = time.monotonic() - started
        if self.settings.decode_tuning_file is not None:
            from metalserve import skinny_linear

            skinny_linear.remember_in(self.settings.decode_tuning_file)
        bundle = self._load(version_id)
        timings["load"] = bundle.load_seconds
        if bundle.part_of is not None:
            if self.engine.tensor_parallel is not None:
                self._verify_version(version_id)
            # A rank's part runs only with the other ranks: the engine warms them up together.
            return bundle
        started = time.monotonic()
        text = generate_once(
            bundle,
            bundle.encode(WARMUP_PROMPT, add_special_tokens=True),
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
        self.metrics.cache_loads.labels(result="corrupt").inc()
        log.error("dropped the node cache's copy of %s", version_id[: store.SHORT_ID_LEN])

    def _load(self, version_id: str) -> LoadedModel:
        settings = self.settings

        part = None
        if settings.tensor_parallel > 1:
            from metalserve.tensor_parallel import TensorParallel

            part = TensorParallel(0, settings.tensor_parallel)

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
                self.metrics.cache_loads.labels(result="hit").inc()
                log.info("loaded %s from the node's cache", version_id[: store.SHORT_ID_LEN])
                return bundle
        bundle = load_from(settings.store)
        self._loaded_from[version_id] = settings.store
        if cache is not None:
            self.metrics.cache_loads.labels(result="miss").inc()
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

    async def load_initial(self) -> None:
        timings = {"process_start": process_seconds()}
        try:
            if self.settings.tensor_parallel > 1:
                self._start_ranks()
            bundle = await in_daemon_thread(
                LOAD_THREAD, self.load_and_warm, self.version_id, timings
            )
            if self.settings.tensor_parallel > 1:
                started = time.monotonic()
                await in_daemon_thread(LOAD_THREAD, self._join_ranks, bundle)
                timings["ranks"] = time.monotonic() - started
            switching = time.monotonic()
            await asyncio.wrap_future(self.engine.swap(bundle))
        except store.VerificationError as exc:
            self._fatal(ExitCode.VERIFICATION_FAILED, str(exc))
        except store.VersionNotFoundError as exc:
            self._fatal(ExitCode.VERSION_NOT_FOUND, str(exc))
        except (LoadError, store.StoreError) as exc:
            self._fatal(ExitCode.LOAD_FAILED, str(exc))
        except Exception as exc:
            log.exception("loading failed")
            self._fatal(ExitCode.LOAD_FAILED, f"loading failed: {exc!r}")
        else:
            timings["decode_path"] = time.monotonic() - switching
            timings["ready"] = process_seconds()
            self.startup = timings
            self.metrics.set_startup(self.startup)
            self.metrics.set_model(bundle.name, bundle.version_id)
            self.phase = Phase.READY
            log.info(
                "ready: %s version %s (%s)",
                bundle.name,
                bundle.version_id,
                ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in self.startup.items()),
            )

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
        self.ranks.watch(lambda why: self._fatal(ExitCode.RANK_FAILED, why))

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

    def _fatal(self, code: ExitCode, message: str) -> None:
        log.error("cannot serve: %s", message)
        self.phase = Phase.FAILED
        self.failure = message
        self.exit_code = code
        self.on_fatal()

    # --- request admission ----------------------------------------------------------------

    def admit(self, model: str) -> LoadedModel:
        if self.draining:
            raise ApiError(503, "the server is draining; retry on another replica", code="draining")
        bundle = self.engine.target_model
        if self.phase is not Phase.READY or bundle is None:
            raise ApiError(503, f"the model is not ready ({self.state()})", code="not_ready")
        if not self.engine.is_alive():
            raise ApiError(503, "the generation engine stopped", code="engine_dead")
        if model != bundle.name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this replica serves {bundle.name!r}",
                param="model",
                code="model_not_found",
            )
        return bundle

    # --- hot reload -----------------------------------------------------------------------

    async def reload(self, ref: str) -> dict[str, Any]:
        """Load, verify and warm up version ``ref``, then swap it in while serving; one at a
        time, only while ready. Returns the answer of ``POST /admin/reload``."""
        if self.draining:
            raise ApiError(503, "the server is draining", code="draining")
        if self.phase is not Phase.READY:
            raise ApiError(409, f"cannot reload while {self.state()}", code="not_ready")
        if self.reload_lock.locked():
            raise ApiError(409, "another reload is in progress", code="reload_in_progress")
        async with self.reload_lock:
            return await self._reload(ref)

    async def _reload(self, ref: str) -> dict[str, Any]:
        settings = self.settings
        try:
            version_id = store.resolve_version(settings.store, settings.model, ref)
        except store.AmbiguousVersionError as exc:
            raise ApiError(400, str(exc), param="version", code="ambiguous_version") from exc
        except store.StoreError as exc:
            self.metrics.reloads.labels(result="not_found").inc()
            raise ApiError(404, str(exc), param="version", code="version_not_found") from exc
        current = self.engine.model
        assert current is not None
        if version_id == current.version_id:
            return {"model": current.name, "version_id": version_id, "changed": False}
        started = time.monotonic()
        try:
            bundle = await in_daemon_thread(LOAD_THREAD, self.load_and_warm, version_id)
        except store.VerificationError as exc:
            self.metrics.reloads.labels(result="verification_failed").inc()
            raise ApiError(409, str(exc), param="version", code="verification_failed") from exc
        except (LoadError, store.StoreError, ValueError, OSError) as exc:
            self.metrics.reloads.labels(result="load_failed").inc()
            raise ApiError(
                422, f"cannot load {version_id[:12]}: {exc}", code="load_failed"
            ) from exc
        old = await asyncio.wrap_future(self.engine.swap(bundle))
        self.version_id = bundle.version_id
        self.release_leases(keep=bundle.version_id)
        self.metrics.set_model(bundle.name, bundle.version_id)
        self.metrics.reloads.labels(result="ok").inc()
        previous = old.version_id if old is not None else None
        del old
        _free_memory(bundle)
        log.info("reloaded %s -> %s", (previous or "")[:12], bundle.short_id)
        return {
            "model": bundle.name,
            "version_id": bundle.version_id,
            "previous_version_id": previous,
            "changed": True,
            "seconds": round(time.monotonic() - started, 3),
        }


def process_seconds() -> float:
    """Seconds since this process started (Linux's /proc/self/stat; the start is in clock ticks
    since boot): the time to ready counts the interpreter's start and the imports too."""
    stat = Path("/proc/self/stat").read_text()
    started_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")


def _free_memory(bundle: LoadedModel) -> None:
    """Return the replaced model's memory (on GPUs the caching allocator keeps it otherwise).
    Unfrozen first: objects that ``server.freeze_heap`` froze are never collected; frozen again
    right after this one collection (not a second one from the server's freeze)."""
    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
    if bundle.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
