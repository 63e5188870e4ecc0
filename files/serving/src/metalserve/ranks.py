"""The other ranks of a tensor-parallel replica (``serve --tensor-parallel N``, issue 21).

Rank 0 is the server process. It starts ranks 1..N-1 at once, as processes of its own
(multiprocessing's spawn: nothing of rank 0's threads or CUDA state is inherited), so that their
imports overlap its own and its load; they join the process group (NCCL on ``cuda:<rank>``, gloo
on the CPU) and wait. As rank 0 starts loading its version (its part), it joins too, from a thread
of its own, and sends the version and the root it loads from (the node's cache, or the store);
each rank reads, verifies and loads its share of every layer from there
(``metalserve.tensor_parallel``), and the rest of the model whole, beside rank 0's load, and
repeats rank 0's decoder steps until rank 0 stops it. Before
serving, every rank tells the others what it loaded (``/version`` lists them). A hot reload ends
the old version's steps (RELOAD) and sends the next version the same way, once rank 0 has loaded
its part and verified every block of it, and the old version's requests are done: each rank
drops its old share first, so a rank never holds two versions (requests wait meanwhile).

A rank's death takes the replica down whole, never half: rank 0 watches the others' processes
and fails the replica when one exits (systemd restarts the unit); the others exit once rank 0's
process is gone, so a restart never finds a stale rank holding a GPU.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# How long rank 0 waits for a stopped rank to exit before killing it.
STOP_SECONDS = 10.0
# How often a rank looks whether rank 0 still runs.
PARENT_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class RankSpec:
    """What a rank needs to load and split its version (picklable: it crosses the spawn)."""

    world: int
    init_method: str
    model: str
    store: str  # where a rank loads from when the node cache's copy of its part is bad
    device: str  # "cpu" or "cuda": rank r runs on cuda:r
    dtype: str
    chunk_size: int
    slots: int
    max_context: int | None
    quantization: str
    decode_mode: str
    decode_compile: str
    decode_attention: str
    decode_gemm: str
    prefix_cache_tokens: int
    decode_tuning_file: Path | None
    log_level: str

    def device_of(self, rank: int) -> str:
        return f"cuda:{rank}" if self.device == "cuda" else "cpu"

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


def rank_info(rank: int, bundle: Any, *, cache_copy_failed: bool = False) -> dict[str, Any]:
    """What a rank reports of itself to the others (``/version``'s ``ranks``;
    ``cache_copy_failed``: its part of the node cache's copy was bad, the store's was loaded)."""
    return {
        "rank": rank,
        "pid": os.getpid(),
        "device": str(bundle.device),
        "version_id": bundle.version_id,
        "verified": True,
        "load_seconds": round(bundle.load_seconds, 3),
        "weights_seconds": round(bundle.weights_seconds, 3),
        # When its load ended (Unix seconds): with load_seconds, whether the ranks loaded together.
        "loaded_at": round(bundle.loaded_at.timestamp(), 3),
        "cache_copy_failed": cache_copy_failed,
    }


def split_decoder(
    bundle: Any,
    slots: int,
    tp: Any,
    *,
    quantization: str,
    decode_mode: str,
    decode_compile: str,
    decode_attention: str,
    decode_gemm: str,
    prefix_cache_tokens: int,
    reserve_bytes: int = 0,
) -> Any:
    """The static decoder of ``tp``'s rank, its share of every layer, its graphs captured (or
    its compiled layer compiled). Every rank builds it here, so that they agree on everything
    but the share (slots, context, quantization, graphs, compilation) and run the same
    collectives in the same order while capturing. On CUDA (``decode_mode`` auto or cuda-graphs)
    the steps are CUDA graphs with NCCL's collectives in them and the layer's elementwise steps
    fused (``layer_kernels``; compiled with ``decode_compile`` on, or auto without Triton), as for
    one GPU; on the CPU eager unless compile is on. No fallback: every rank must run the same
    path."""
    from metalserve import layer_kernels, staticdecode

    graphs = bundle.device.type == "cuda" and decode_mode in ("auto", "cuda-graphs")
    decoder = staticdecode.StaticDecoder(
        bundle.model,
        slots=slots,
        max_length=bundle.max_context,
        device=bundle.device,
        dtype=bundle.dtype,
        cuda_graphs=graphs,
        compile_layers=decode_compile == "on"
        or (decode_compile == "auto" and graphs and not layer_kernels.triton_available()),
        quantization=quantization,
        attention=decode_attention,
        gemm=decode_gemm,
        prefix_cache_tokens=prefix_cache_tokens,
        tp=tp,
        reserve_bytes=reserve_bytes,
    )
    decoder.capture_all()
    return decoder


def join_group(spec: RankSpec, rank: int) -> Any:
    """Join the replica's process group as ``rank``; its ``TensorParallel``."""
    import torch.distributed as dist

    from metalserve.tensor_parallel import TensorParallel

    if spec.device == "cuda":
        import torch

        torch.cuda.set_device(spec.device_of(rank))
    dist.init_process_group(
        spec.backend, init_method=spec.init_method, rank=rank, world_size=spec.world
    )
    return TensorParallel(rank, spec.world)


def share_version(root: str = "", version_id: str = "") -> tuple[str, str]:
    """Rank 0's root and version id, on every rank (rank 0 passes them; a collective)."""
    import torch.distributed as dist

    shared: list[Any] = [root, version_id]
    dist.broadcast_object_list(shared, src=0)
    return str(shared[0]), str(shared[1])


def announce_reload(tp: Any, device: Any, root: str, version_id: str) -> None:
    """Rank 0: end the other ranks' steps of the version they follow, and send them the next."""
    from metalserve import tensor_parallel

    tp.send_step(tensor_parallel.RELOAD, [], [], device)
    share_version(root, version_id)


def exchange(info: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """Every rank's ``info``, in rank order (a collective: every rank calls it once)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, info)
    return gathered


def follow(spec: RankSpec, rank: int, parent: int) -> None:
    """A rank other than 0, in its own process: load, split, report, then follow rank 0."""
    _die_with_parent(parent)
    logging.basicConfig(
        level=spec.log_level.upper(),
        format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s",
    )
    import torch

    from metalserve import store
    from metalserve.loader import load_version
    from metalserve.tensor_parallel import RELOAD

    if spec.decode_tuning_file is not None:
        from metalserve import skinny_linear

        skinny_linear.remember_in(spec.decode_tuning_file)
    tp = join_group(spec, rank)
    while True:
        root, version_id = share_version()

        def load(source: str, version_id: str = version_id) -> Any:
            return load_version(
                Path(source),
                spec.model,
                version_id,
                device=spec.device_of(rank),
                dtype=spec.dtype,
                chunk_size=spec.chunk_size,
                tensor_parallel=tp,
                max_context=spec.max_context,
            )

        cache_copy_failed = False
        try:
            bundle = load(root)
        except (store.StoreError, OSError) as exc:
            if Path(root) == Path(spec.store):
                raise
            # This rank's part of the node cache's copy is bad (rank 0 verifies only its own),
            # or the copy went while this rank read it: the store's is the one to trust.
            log.error("the node cache's copy failed, loading the store's: %s", exc)
            bundle = load(spec.store)
            cache_copy_failed = True
        exchange(rank_info(rank, bundle, cache_copy_failed=cache_copy_failed), spec.world)
        decoder = split_decoder(
            bundle,
            spec.slots,
            tp,
            quantization=spec.quantization,
            decode_mode=spec.decode_mode,
            decode_compile=spec.decode_compile,
            decode_attention=spec.decode_attention,
            decode_gemm=spec.decode_gemm,
            prefix_cache_tokens=spec.prefix_cache_tokens,
        )
        log.info(
            "rank %d of %d follows rank 0 on %s, version %s",
            rank,
            spec.world,
            bundle.device,
            bundle.short_id,
        )
        ended = decoder.follow()
        # This version's share goes before the next one loads.
        del decoder, bundle
        gc.collect()
        if spec.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        if ended != RELOAD:
            break
    log.info("rank %d stops", rank)
    # Out at once, without tearing the group down or finalizing the interpreter: rank 0 may be
    # closing its end meanwhile, and a teardown that meets it can abort the process (SIGABRT,
    # "terminate called without an active exception": the tests' own ranks, 2 runs of 16, none
    # of 24 once they left this way). The kernel and the driver free what the group held.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _die_with_parent(parent: int) -> None:
    """Exit at once when rank 0's process is gone (this one was given to another parent),
    whatever this rank was doing: a thread watches. (Not prctl's parent-death signal: it fires
    when the thread that started the rank ends, and rank 0's loader thread does.)"""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="metalserve-parent", daemon=True).start()


class Ranks:
    """Rank 0's handle on ranks 1..world-1: start, watch, stop."""

    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        self._dir = Path(spec.init_method.removeprefix("file://")).parent
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(
                target=follow, args=(spec, rank, os.getpid()), name=f"metalserve-rank-{rank}"
            )
            for rank in range(1, spec.world)
        ]
        self._stopping = threading.Event()
        self.failure: str | None = None

    @classmethod
    def start(cls, world: int, **fields: Any) -> Ranks:
        """Start ranks 1..world-1 (``fields``: ``RankSpec``'s); they wait for rank 0's version."""
        # The group meets in a file of a private directory: no port to pick, nothing to leak.
        private = tempfile.mkdtemp(prefix="metalserve-ranks-")
        spec = RankSpec(world=world, init_method=f"file://{private}/group", **fields)
        ranks = cls(spec)
        for process in ranks.processes:
            process.start()
        pids = ", ".join(str(p.pid) for p in ranks.processes)
        log.info("started ranks 1..%d (pids %s)", world - 1, pids)
        return ranks

    def watch(self, on_death: Callable[[str], None]) -> None:
        """Call ``on_death`` (once, from a daemon thread) when a rank exits unasked."""

        def run() -> None:
            sentinels = {p.sentinel: p for p in self.processes}
            ended = wait(list(sentinels))
            process = sentinels[ended[0]]  # type: ignore[index]
            process.join(1)
            # A rank exits 0 only after rank 0's STOP (the engine's end).
            if self._stopping.is_set() or process.exitcode == 0:
                return
            self.failure = (
                f"rank {process.name.rsplit('-', 1)[1]} (pid {process.pid}) exited with "
                f"{_exit_text(process.exitcode)}: the replica stops whole"
            )
            log.error("%s", self.failure)
            on_death(self.failure)

        threading.Thread(target=run, name="metalserve-ranks", daemon=True).start()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """After rank 0 sent STOP (or failed): wait for the ranks, kill what remains."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                log.warning("rank %s did not stop in %.0fs: killed", process.name, timeout)
                process.kill()
                process.join(5)
        shutil.rmtree(self._dir, ignore_errors=True)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
