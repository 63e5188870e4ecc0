"""Stream safetensors shards from the store straight into device tensors.

Each shard is read sequentially in large chunks into a few reused host buffers (pinned on CUDA)
whose bytes are copied, ``non_blocking`` on a side CUDA stream, into the destination tensors the
caller names, while the same buffer is hashed on other threads (hashlib and blake3 release the
GIL for large buffers). The tensor layout comes from the safetensors header, parsed here (8-byte
little-endian length + JSON), so no host copy of a tensor is ever materialized. Several shards
are streamed at once, one reader thread each; with block digests a shard is cut into ranges of
whole blocks that several readers stream at once.

Hashing follows the manifest. With block digests (manifest formats 2 and 3) every read is a whole
number of blocks and every block is hashed as its own task on one pool of threads shared by all
shards (the cores the readers leave): one hash runs at one core's speed (SHA-256 ~1.5 GB/s, BLAKE3
several times that), so only hashing many blocks at once keeps up with the copies. Format 1
entries (one sha256 per file) are hashed in order on one hasher thread per reader, as before: at
most one core per shard.

On a CUDA device, BLAKE3 block digests (manifest format 3) are computed on the GPU instead
(``metalserve.gpu_blake3``, Triton; ``verify_on``, default ``VERIFY_ON``): each read is copied
whole from its pinned buffer to a device staging buffer after the reads before it, the tensors are
copied from there device to device, and every ``DEVICE_HASH_BATCH`` bytes (or at the end of the
range) the staged blocks are hashed there, all on the reader's stream; the digests come back once
per reader, when it has no more to read. The host then never reads the bytes a second time (the
CPU threads' hashing re-read every byte after the copy, and capped the warm load), what is
verified is what the device holds, and the cores that hashed read instead. Without Triton, on
CPU devices, with SHA-256 blocks (format 2) or one whole-file hash (format 1), or when the
kernels' self-test fails, blocks are hashed on the host as above.

Verification semantics are those of ``store.verify_files``: the bytes land in the destinations
before their hashes are known, but ``load_weights`` returns only after every shard matched its
manifest entry (size and every block, or the whole-file hash) and raises ``VerificationError``
otherwise, so nothing can use unverified weights. The hashes are computed over the very buffers
the copies read from (the host buffers, or the device staging buffer), so what reaches the
destinations is what was verified. A shard whose header cannot be used is hashed in full first: a
tampered file is reported as a verification failure, not as a format problem.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import hashlib
import io
import itertools
import json
import logging
import os
import queue
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metalserve import store
from metalserve.threads import DaemonExecutor

log = logging.getLogger(__name__)

# The safetensors library refuses larger headers too.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Host buffers per streaming worker: one being read, the others being hashed or copied. With block
# digests each worker gets enough more to keep its share of the hashing threads busy.
BUFFERS_PER_WORKER = 4
MAX_BUFFERS_PER_WORKER = 16
# With blocks hashed on the device a buffer is free again once its copy to the device is done.
DEVICE_HASH_BUFFERS_PER_WORKER = 3
# Blocks hashed on the device: each reader's reads are gathered in a device buffer of this many
# bytes and hashed together (one hashing call per 4 reads of 16 MiB: each call costs ~70 us of
# Python, holding the GIL the readers need; H200, 2026-12-03).
DEVICE_HASH_BATCH = 64 * 1024 * 1024
# Reader threads at most, beside threads hashing on the host (they take the other cores) ...
MAX_WORKERS = 8
# ... and when no core hashes (blocks hashed on the device, or no verification): three quarters
# of the cores, the rest left to the GIL's work and the driver. On two H200 hosts (16 cores,
# 2026-12-03) neither 12 nor 16 was always faster: warm without hashing 12 readers 32.5 GB/s and
# 16 28.2 on one, 26.1 and 31.6 on the other; 8 were slower on both (26.3, 25.4).
MAX_READERS = 16
# With block digests a shard is streamed in ranges of about this many bytes, several at once: one
# thread copies out of the page cache at ~4 GB/s, so one reader per shard capped a warm load of 4
# shards near 13-16 GB/s; in ranges, 20-22 GB/s (H200 host, 16 cores, 2026-12-03: 8 readers and 8
# hashers; 128 MiB ranges a little faster than 256 or 512; readers that hash their own reads, or
# more readers, were slower).
RANGE_SIZE = 128 * 1024 * 1024
# Where BLAKE3 block digests are computed when the caller does not say (``verify_on``): "auto" is
# on the device when it is a CUDA device and ``metalserve.gpu_blake3`` works there, else on the
# host; "host" always on the host (CPU threads); "device" on the device or not at all (an error).
VERIFY_ON = "auto"
VERIFY_CHOICES = ("auto", "host", "device")

_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
# Only the dtypes this torch build has (older builds lack the float8 and unsigned ones).
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _DTYPE_NAMES.items() if hasattr(torch, attr)
}


class WeightsError(Exception):
    """The shards are intact but cannot be loaded (bad header, unexpected or misshapen tensors)."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of a shard, as its header describes it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def parse_header(head: bytes, file_size: int) -> list[TensorSpec]:
    """The tensors described by ``head`` (the file's first 8 + N bytes), sorted by offset."""
    if len(head) < 8:
        raise WeightsError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size or len(head) < 8 + length:
        raise WeightsError(f"header length {length} does not fit the file")
    try:
        doc = json.loads(head[8 : 8 + length])
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(f"header is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise WeightsError("header is not a JSON object")
    data_start = 8 + length
    specs = []
    for name, info in doc.items():
        if name == "__metadata__":
            continue
        specs.append(_spec(name, info, data_start))
    specs.sort(key=lambda s: s.begin)
    previous_end = data_start
    for spec in specs:
        if spec.begin < previous_end:
            raise WeightsError(f"tensor {spec.name!r} overlaps the one before it")
        previous_end = spec.end
    if previous_end > file_size:
        raise WeightsError(f"tensors end at byte {previous_end}, past the end of the file")
    return specs


def _spec(name: str, info: object, data_start: int) -> TensorSpec:
    try:
        assert isinstance(info, dict)
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (AssertionError, KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"tensor {name!r}: unusable header entry {info!r}") from exc
    numel = 1
    for dim in shape:
        if dim < 0:
            raise WeightsError(f"tensor {name!r}: negative dimension in {shape}")
        numel *= dim
    if begin < 0 or end - begin != numel * dtype.itemsize:
        raise WeightsError(
            f"tensor {name!r}: offsets {begin}..{end} do not hold {shape} of {dtype}"
        )
    return TensorSpec(name, dtype, shape, data_start + begin, data_start + end)


def read_header(path: Path) -> list[TensorSpec]:
    with path.open("rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise WeightsError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise WeightsError(f"header length {length} does not fit the file")
        return parse_header(prefix + fh.read(length), size)


# --- streaming --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """A destination for part of a 2-D tensor (a tensor-parallel rank's share): rows (``dim``
    0; a 1-D tensor's elements) or columns (``dim`` 1) ``[start, stop)`` go to ``dest``. Rows are
    contiguous bytes of the file: only they (and the blocks around them) are read. A column
    touches every row: the whole tensor is read, and only the columns are kept."""

    dest: torch.Tensor
    dim: int
    start: int
    stop: int

    def rows_of(self, spec: TensorSpec) -> TensorSpec:
        """The rows of ``spec`` this part keeps (``dim`` 0): a smaller tensor of the file."""
        row = spec.nbytes // spec.shape[0]
        return TensorSpec(
            spec.name,
            spec.dtype,
            self.shape_of(spec.shape),
            spec.begin + self.start * row,
            spec.begin + self.stop * row,
        )

    def shape_of(self, whole: tuple[int, ...]) -> tuple[int, ...]:
        """The part's shape in a tensor of shape ``whole``."""
        if self.dim not in (0, 1) or self.dim >= len(whole) or len(whole) > 2:
            raise WeightsError(f"a part along dimension {self.dim} of a tensor of shape {whole}")
        if not 0 <= self.start < self.stop <= whole[self.dim]:
            raise WeightsError(f"part {self.start}..{self.stop} of dimension {self.dim} of {whole}")
        shape = list(whole)
        shape[self.dim] = self.stop - self.start
        return tuple(shape)


@dataclass(eq=False)
class _Target:
    """Where one tensor's bytes go: straight into the destination, or via a staging buffer when
    the destination needs a dtype conversion, is not contiguous, or keeps some ``columns`` of
    the tensor only."""

    spec: TensorSpec
    dest: torch.Tensor
    direct: bool
    columns: tuple[int, int] | None = None
    staging: torch.Tensor | None = None
    filled: int = 0

    def byte_view(self) -> torch.Tensor:
        if self.direct:
            return self.dest.view(-1).view(torch.uint8)
        if self.staging is None:
            # Allocated on first use (inside the copy stream's context), freed once converted.
            self.staging = torch.empty(self.spec.nbytes, dtype=torch.uint8, device=self.dest.device)
        return self.staging

    def written(self, count: int) -> None:
        self.filled += count
        if self.filled == self.spec.nbytes and not self.direct:
            assert self.staging is not None
            whole = self.staging.view(self.spec.dtype).view(self.spec.shape)
            self.dest.copy_(whole if self.columns is None else whole[:, slice(*self.columns)])
            self.staging = None


@dataclass(eq=False)
class _Job:
    """Bytes [begin, end) of one shard (end None: to the end of the file)."""

    index: int
    path: Path
    targets: list[_Target]
    blocks: store.Blocks | None  # the manifest's block digests: reads are whole blocks
    read_size: int
    # block index -> digest, as hashed: shared by the ranges of one shard
    digests: dict[int, str] = field(default_factory=dict)
    begin: int = 0
    end: int | None = None
    device_hash: bool = False  # blocks hashed on the device (BLAKE3), not on the host
    # The byte ranges that must be read (the header, the tensors or parts wanted), or None: all.
    spans: list[tuple[int, int]] | None = None
    ends: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.ends = [t.spec.end for t in self.targets]

    def ranges(self, size: int, range_size: int) -> list[_Job]:
        """This shard as jobs of about ``range_size`` bytes each, in whole blocks, that several
        readers may stream at once, covering only the blocks its ``spans`` touch; itself alone
        when it has no block digests (a whole-file hash reads everything, in order). A tensor
        that must be converted after all its bytes arrived is never cut between jobs."""
        if self.blocks is None:
            return [self]
        block = self.blocks.size
        covered = _covering_blocks(self.spans or [(0, size)], block, size)
        step = block * max(1, range_size // block)
        # A tensor converted once all its bytes arrived (``_Target.written``) is read by one job.
        whole = [(t.spec.begin, t.spec.end) for t in self.targets if not t.direct]
        bounds = []
        for begin, end in covered:
            lo = begin
            while lo < end:
                hi = _past(min(lo + step, end), whole, block, end)
                bounds.append((lo, hi))
                lo = hi
        if bounds == [(0, size)]:
            return [self]
        return [
            _Job(
                self.index,
                self.path,
                self.targets,
                self.blocks,
                self.read_size,
                self.digests,
                lo,
                hi,
                self.device_hash,
            )
            for lo, hi in bounds
        ]


def _past(at: int, whole: list[tuple[int, int]], block: int, end: int) -> int:
    """``at``, or the first block boundary after it (at most ``end``) inside none of ``whole``."""
    moved = True
    while moved and at < end:
        moved = False
        for begin, stop in whole:
            if begin < at < stop:
                at, moved = min(-(-stop // block) * block, end), True
    return at


def _covering_blocks(
    spans: Sequence[tuple[int, int]], block_size: int, size: int
) -> list[tuple[int, int]]:
    """The whole blocks that hold ``spans`` (sorted, merged): what must be read to verify them."""
    covered: list[tuple[int, int]] = []
    for begin, end in sorted(spans):
        lo = begin // block_size * block_size
        hi = min(-(-end // block_size) * block_size, size)
        if covered and lo <= covered[-1][1]:
            covered[-1] = (covered[-1][0], max(covered[-1][1], hi))
        else:
            covered.append((lo, hi))
    return covered


@dataclass(frozen=True, slots=True)
class StreamResult:
    size: int  # bytes read
    sha256: str | None  # the whole file's, when it was hashed whole
    blocks: tuple[str, ...] | None = None  # each block's read, when hashed block by block ...
    block_indices: tuple[int, ...] = ()  # ... and their indices (every block, unless spans)


class _Slot:
    """One reusable host buffer and what must finish before it may be overwritten."""

    def __init__(self, size: int, *, pinned: bool) -> None:
        self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        # The tensor's memory as a writable buffer for readinto() and hashlib (no numpy needed).
        raw = (ctypes.c_ubyte * size).from_address(self.buffer.data_ptr())
        self.view = memoryview(raw).cast("B")
        self.hashed: list[Future[None]] = []
        self.copied = torch.cuda.Event() if pinned else None
        self.copy_pending = False

    def wait(self) -> None:
        hashed, self.hashed = self.hashed, []
        for future in hashed:
            future.result()
        if self.copy_pending and self.copied is not None:
            self.copy_pending = False
            self.copied.synchronize()


def _hash_block(
    digests: dict[int, str], index: int, data: memoryview, hasher: Callable[[memoryview], str]
) -> None:
    digests[index] = hasher(data)


class _Worker:
    """Streams whole shards, one after another: reads on its own thread, hashes on others
    (the shared block pool, or its own serial hasher for whole-file digests) or on the device,
    copies on its own CUDA stream, so the three overlap."""

    def __init__(
        self,
        device: torch.device,
        slot_size: int,
        slots: int,
        *,
        verify: bool,
        pool: DaemonExecutor | None,
    ) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots = [_Slot(slot_size, pinned=self.cuda) for _ in range(slots)]
        self.verify = verify
        self.pool = pool
        self.hasher: DaemonExecutor | None = None  # for whole-file digests, started when needed
        self.device = device
        self.slot_size = slot_size
        # Blocks hashed on the device: reads are copied whole, one after another, to this buffer
        # (one is enough: everything that uses it is queued on self.stream) and hashed together
        # once it is full or the job ends (``filled`` bytes from block ``first``); the digests,
        # not yet read back: (job, first block, int32 [blocks, 8] on the device).
        self.batch = max(slot_size, DEVICE_HASH_BATCH // slot_size * slot_size)
        self.staging: torch.Tensor | None = None
        self.filled = 0
        self.first = 0
        self.pending: list[tuple[_Job, int, torch.Tensor]] = []

    def run(self, jobs: queue.SimpleQueue[_Job], results: list[tuple[_Job, StreamResult]]) -> None:
        with torch.no_grad():  # grad mode is per thread, and destinations may be parameters
            while True:
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    break
                results.append((job, self.stream_file(job)))
            self._collect()

    def close(self) -> None:
        """Wait for whatever is still in flight (after a failure), then stop the hasher."""
        for slot in self.slots:
            with contextlib.suppress(Exception):
                slot.wait()
        if self.stream is not None:
            with contextlib.suppress(Exception):
                self.stream.synchronize()  # device-to-device copies and hashing kernels
        self.staging = None
        if self.hasher is not None:
            self.hasher.shutdown()

    def _collect(self) -> None:
        """Wait for this worker's device work, then read every digest it computed back at once
        into its job."""
        if self.stream is not None:
            self.stream.synchronize()
        pending, self.pending = self.pending, []
        if not pending:
            return
        from metalserve import gpu_blake3

        hexes = iter(gpu_blake3.hexdigests(torch.cat([digests for _, _, digests in pending])))
        for job, first, digests in pending:
            for number in range(digests.shape[0]):
                job.digests[first + number] = next(hexes)

    def stream_file(self, job: _Job) -> StreamResult:
        """Stream the job's bytes; returns how many it read (and the whole file's sha256 when
        hashed whole; block digests go to ``job.digests``)."""
        blocks = job.blocks if self.verify else None
        digest = None
        if self.verify and blocks is None:
            digest = hashlib.sha256()
            if self.hasher is None:
                self.hasher = DaemonExecutor("metalserve-hash")
        offset = job.begin
        with job.path.open("rb", buffering=0) as fh:
            if hasattr(os, "posix_fadvise"):
                # Doubles the kernel's read-ahead window on Linux: matters on cold reads.
                length = 0 if job.end is None else job.end - job.begin
                os.posix_fadvise(fh.fileno(), job.begin, length, os.POSIX_FADV_SEQUENTIAL)
            fh.seek(job.begin)
            for index in itertools.count():
                slot = self.slots[index % len(self.slots)]
                slot.wait()
                want = job.read_size if job.end is None else min(job.read_size, job.end - offset)
                count = _fill(fh, slot.view[:want]) if want > 0 else 0
                if not count:
                    break
                if blocks is not None and job.device_hash:
                    # Hashed on the device, from where the tensors are then copied.
                    self._stage(job, blocks, slot, count, offset)
                    offset += count
                    continue
                if blocks is not None:
                    # offset is a multiple of the block size: every read is whole blocks.
                    assert self.pool is not None
                    first = offset // blocks.size
                    hasher = store.BLOCK_HASHERS[blocks.algorithm]
                    slot.hashed = [
                        self.pool.submit(
                            _hash_block, job.digests, first + number, slot.view[lo:hi], hasher
                        )
                        for number, lo in enumerate(range(0, count, blocks.size))
                        for hi in (min(lo + blocks.size, count),)
                    ]
                elif digest is not None and self.hasher is not None:
                    slot.hashed = [self.hasher.submit(digest.update, slot.view[:count])]
                context = (
                    torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
                )
                with context:
                    self._scatter(job, slot.buffer[:count], offset)
                    if slot.copied is not None and self.stream is not None:
                        slot.copied.record(self.stream)
                        slot.copy_pending = True
                offset += count
        if blocks is not None and job.device_hash:
            self._hash_staged(job, blocks)
        for slot in self.slots:
            slot.wait()
        return StreamResult(offset - job.begin, digest.hexdigest() if digest is not None else None)

    def _stage(self, job: _Job, blocks: store.Blocks, slot: _Slot, count: int, offset: int) -> None:
        """Copy the read (whole blocks, or the file's last ones) to the device staging buffer
        after the reads before it, free the host buffer once that copy is done, and copy the
        tensors from there, all queued on this worker's stream (on a CPU device, in order)."""
        if self.filled + count > self.batch:
            self._hash_staged(job, blocks)
        context = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with context:
            if self.staging is None:
                self.staging = torch.empty(self.batch, dtype=torch.uint8, device=self.device)
            if not self.filled:
                # offset is a multiple of the block size: every read is whole blocks.
                self.first = offset // blocks.size
            staged = self.staging[self.filled : self.filled + count]
            staged.copy_(slot.buffer[:count], non_blocking=self.cuda)
            if slot.copied is not None and self.stream is not None:
                slot.copied.record(self.stream)
                slot.copy_pending = True
            self.filled += count
            self._scatter(job, staged, offset)

    def _hash_staged(self, job: _Job, blocks: store.Blocks) -> None:
        """Hash the blocks staged so far (on this worker's stream); their digests are read back
        once the worker has no more to read."""
        if not self.filled or self.staging is None:
            return
        from metalserve import gpu_blake3

        context = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with context:
            digests = gpu_blake3.blake3_blocks(self.staging[: self.filled], blocks.size)
        self.pending.append((job, self.first, digests))
        self.filled = 0

    def _scatter(self, job: _Job, chunk: torch.Tensor, offset: int) -> None:
        """Copy the parts of every tensor that lie in file bytes [offset, offset + len(chunk))
        from ``chunk``, on the current stream."""
        first = bisect.bisect_right(job.ends, offset)
        end = offset + chunk.numel()
        if first >= len(job.targets) or job.targets[first].spec.begin >= end:
            return
        for target in job.targets[first:]:
            spec = target.spec
            if spec.begin >= end:
                break
            lo, hi = max(spec.begin, offset), min(spec.end, end)
            target.byte_view()[lo - spec.begin : hi - spec.begin].copy_(
                chunk[lo - offset : hi - offset], non_blocking=self.cuda
            )
            target.written(hi - lo)


def _fill(fh: io.FileIO, view: memoryview) -> int:
    """Read until ``view`` is full or the file ends (short reads happen, e.g. on NFS)."""
    got = 0
    while got < len(view):
        count = fh.readinto(view[got:])
        if not count:
            break
        got += count
    return got


def default_workers(jobs: int, *, host_hashing: bool = True) -> int:
    """Readers: one per shard or range, at most half the cores when the rest hash on the host,
    else (blocks hashed on the device, or nothing hashed) three quarters of them, up to
    ``MAX_READERS``."""
    cores = store.default_threads()
    if host_hashing:
        return max(1, min(jobs, cores // 2, MAX_WORKERS))
    return max(1, min(jobs, cores * 3 // 4, MAX_READERS))


def default_hash_threads(workers: int) -> int:
    """Block-hashing threads: the cores the readers leave. Measured on a 16-core H200 host
    (2026-11-22), 4 readers + 12 hashers loaded warm shards faster than + 16 or + 24: more
    runnable threads than cores delay the readers, and the pipeline stalls."""
    return max(1, store.default_threads() - workers)


def read_size(blocks: store.Blocks | None, chunk_size: int) -> int:
    """Bytes per read: ``chunk_size``, or with block digests the whole blocks nearest to it."""
    if blocks is None:
        return chunk_size
    return blocks.size * max(1, round(chunk_size / blocks.size))


def stream_shards(
    jobs: Sequence[tuple[Path, Sequence[tuple[TensorSpec, torch.Tensor | Part]]]],
    *,
    device: torch.device,
    chunk_size: int = store.CHUNK_SIZE,
    verify: bool = True,
    workers: int | None = None,
    blocks: Sequence[store.Blocks | None] | None = None,
    hash_threads: int | None = None,
    range_size: int = RANGE_SIZE,
    verify_on: str | None = None,
    spans: Sequence[list[tuple[int, int]] | None] | None = None,
) -> list[StreamResult]:
    """Stream every (file, [(tensor spec, destination)]) job; return each file's size and hashes.

    With ``spans`` (one per job: byte ranges, or None for the whole file) a file with block
    digests is read only in the blocks that hold its spans, and only those blocks are hashed
    (``StreamResult.block_indices``); a file without block digests is read whole.

    ``blocks`` (one per job, None for a file without block digests) makes the reads whole blocks,
    lets several readers stream ranges of ``range_size`` bytes of one file at once and, with
    ``verify``, hashes each block: BLAKE3 blocks on the device where ``verify_on`` (default
    ``VERIFY_ON``) allows it, others on a pool of ``hash_threads`` threads (default:
    ``default_hash_threads``); other files are hashed whole. Destinations must be on ``device``
    and have the spec's shape. Returns once every copy and hash has completed, so the
    destinations are ready for any stream.
    """
    if device.type == "cuda" and device.index is None:
        # "cuda" means the current device; tensors report theirs with its index.
        device = torch.device("cuda", torch.cuda.current_device())
    layouts = list(blocks) if blocks is not None else [None] * len(jobs)
    wanted = list(spans) if spans is not None else [None] * len(jobs)
    if len(layouts) != len(jobs) or len(wanted) != len(jobs):
        raise ValueError(f"{len(layouts)} block layouts, {len(wanted)} spans for {len(jobs)} files")
    on_device = verify and _hash_on_device(
        device,
        verify_on or VERIFY_ON,
        any(b is not None and b.algorithm == "blake3" for b in layouts),
    )
    built = [
        _Job(
            i,
            path,
            [_target(spec, dest, device) for spec, dest in targets],
            layout,
            read_size(layout, chunk_size),
            device_hash=on_device and layout is not None and layout.algorithm == "blake3",
            spans=span,
        )
        for i, ((path, targets), layout, span) in enumerate(zip(jobs, layouts, wanted, strict=True))
    ]
    if not built:
        return []
    pending: queue.SimpleQueue[_Job] = queue.SimpleQueue()
    # Largest first: the shards then finish together instead of one long one trailing.
    sizes = {job.index: job.path.stat().st_size for job in built}
    parts = [
        part
        for job in sorted(built, key=lambda j: -sizes[j.index])
        for part in job.ranges(sizes[job.index], range_size)
    ]
    for part in parts:
        pending.put(part)
    results: list[tuple[_Job, StreamResult]] = []
    host_hashing = verify and not all(job.device_hash for job in built)
    count = (
        workers if workers is not None else default_workers(len(parts), host_hashing=host_hashing)
    )
    count = max(1, min(count, len(parts)))
    pool = None
    slots = BUFFERS_PER_WORKER if host_hashing else DEVICE_HASH_BUFFERS_PER_WORKER
    if verify and any(job.blocks is not None and not job.device_hash for job in built):
        threads = hash_threads or default_hash_threads(count)
        pool = DaemonExecutor("metalserve-hash-block", threads)
        # Enough buffers that the readers together keep every hashing thread busy (capped: each
        # is a pinned block-sized buffer).
        slots = max(BUFFERS_PER_WORKER, min(-(-threads // count) + 2, MAX_BUFFERS_PER_WORKER))
    slot_size = max(job.read_size for job in built)
    if device.type == "cuda":
        # The side streams must not overtake work queued so far (the destinations' creation).
        torch.cuda.current_stream(device).synchronize()
    try:
        stream_workers = [
            _Worker(device, slot_size, slots, verify=verify, pool=pool) for _ in range(count)
        ]
        with DaemonExecutor("metalserve-read", count) as readers:
            done = [readers.submit(_run_worker, w, pending, results) for w in stream_workers]
        for future in done:
            future.exception()  # wait for every worker before raising: none may still write
        for future in done:
            future.result()  # the first failure (I/O or CUDA error), if any
    finally:
        if pool is not None:
            pool.shutdown()
    assert len(results) == len(parts)
    return [
        _shard_result(job, [r for part, r in results if part.index == job.index]) for job in built
    ]


def _hash_on_device(device: torch.device, verify_on: str, blake3_blocks: bool) -> bool:
    """Whether BLAKE3 block digests are computed on ``device`` (see ``VERIFY_ON``)."""
    if verify_on not in VERIFY_CHOICES:
        raise ValueError(f"verify_on {verify_on!r} is not one of {', '.join(VERIFY_CHOICES)}")
    if verify_on == "host" or not blake3_blocks:
        return False
    if verify_on == "auto" and device.type != "cuda":
        return False
    from metalserve import gpu_blake3  # imports Triton, when installed: only when needed

    problem = gpu_blake3.missing(device) or gpu_blake3.self_test(device)
    if problem is None:
        return True
    if verify_on == "device":
        raise WeightsError(f"cannot verify BLAKE3 blocks on {device}: {problem}")
    if device.type == "cuda" and problem not in _REPORTED:
        _REPORTED.add(problem)
        log.warning("BLAKE3 blocks are verified on CPU threads: on %s, %s", device, problem)
    return False


_REPORTED: set[str] = set()


def _shard_result(job: _Job, parts: list[StreamResult]) -> StreamResult:
    """One shard's size and hashes from what its ranges read."""
    size = sum(part.size for part in parts)
    if job.blocks is not None and job.digests:
        indices = tuple(sorted(job.digests))
        return StreamResult(size, None, tuple(job.digests[i] for i in indices), indices)
    return StreamResult(size, parts[0].sha256 if len(parts) == 1 else None)


def _run_worker(
    worker: _Worker, jobs: queue.SimpleQueue[_Job], results: list[tuple[_Job, StreamResult]]
) -> None:
    try:
        worker.run(jobs, results)
    except BaseException:
        # Empty the queue so that the other workers stop after their current shard.
        with contextlib.suppress(queue.Empty):
            while True:
                jobs.get_nowait()
        raise  # once the finally closed the worker: no copy may still be in flight then
    finally:
        worker.close()


def _target(spec: TensorSpec, dest: torch.Tensor | Part, device: torch.device) -> _Target:
    columns = None
    if isinstance(dest, Part):
        part, dest = dest, dest.dest
        expected = part.shape_of(spec.shape)
        if part.dim == 0:
            spec = part.rows_of(spec)
        else:
            columns = (part.start, part.stop)
    else:
        expected = spec.shape
    if tuple(dest.shape) != expected:
        raise WeightsError(
            f"tensor {spec.name!r} has shape {list(expected)}, the model expects {list(dest.shape)}"
        )
    dest = dest.detach()
    direct = (
        columns is None
        and dest.dtype == spec.dtype
        and dest.is_contiguous()
        and dest.device == device
    )
    return _Target(spec, dest, direct, columns)


# --- verified loading from the store -----------------------------------------------------------

Destination = Callable[[TensorSpec], "torch.Tensor | Part | None"]


def load_weights(
    root: Path,
    entries: Sequence[store.FileEntry],
    version_id: str,
    destination: Destination,
    *,
    device: torch.device,
    chunk_size: int = store.CHUNK_SIZE,
    verify: bool = True,
    workers: int | None = None,
    hash_threads: int | None = None,
    range_size: int = RANGE_SIZE,
    verify_on: str | None = None,
) -> list[str]:
    """Stream the shards ``entries`` of a version into the tensors ``destination`` names.

    ``destination(spec)`` returns the tensor to fill (new on ``device``, or a parameter), a
    ``Part`` of it to fill (a shard with parts is read only where its header and the tensors and
    rows wanted lie, and only the blocks read are verified), or None for a tensor the caller does
    not know. Returns the names loaded. Raises ``VerificationError``
    naming every shard that does not match the manifest, and ``WeightsError`` for intact shards
    that cannot be used. ``verify=False`` (benchmarks only) skips hashing. Entries with block
    digests are verified block by block: BLAKE3 blocks on a CUDA device by the device itself
    (``verify_on``, default ``VERIFY_ON``: "auto"), others on ``hash_threads`` threads (default:
    the cores the readers leave).
    """
    jobs: list[tuple[Path, list[tuple[TensorSpec, torch.Tensor | Part]]]] = []
    spans: list[list[tuple[int, int]] | None] = []
    names: list[str] = []
    for entry in entries:
        path = root / entry.path
        if verify:
            problem = store.check_entry(entry, path.stat().st_size, entry.sha256)
            if problem:  # a size mismatch: no need to read anything
                raise store.VerificationError(version_id, [problem])
        try:
            jobs.append((path, _plan(path, destination)))
        except WeightsError as exc:
            _raise_if_tampered(root, entry, version_id, verify, hash_threads)
            raise WeightsError(f"{entry.path}: {exc}") from exc
        names.extend(spec.name for spec, _ in jobs[-1][1])
        spans.append(_spans(path, jobs[-1][1]))

    results = stream_shards(
        jobs,
        device=device,
        chunk_size=chunk_size,
        verify=verify,
        workers=workers,
        blocks=[entry.blocks for entry in entries],
        hash_threads=hash_threads,
        range_size=range_size,
        verify_on=verify_on,
        spans=spans,
    )
    if verify:
        problems = [
            problem
            for entry, result, span in zip(entries, results, spans, strict=True)
            if (problem := _problem(entry, result, span))
        ]
        if problems:
            raise store.VerificationError(version_id, problems)
    return names


def _problem(
    entry: store.FileEntry, result: StreamResult, spans: list[tuple[int, int]] | None
) -> str | None:
    if entry.blocks is None:
        return store.check_entry(entry, result.size, result.sha256 or "")
    if spans is None:
        return store.check_blocks(entry, result.size, result.blocks or ())
    # Parts: exactly the blocks that hold the spans must have been read, each as the manifest
    # says (a file cut short after its size was checked reads fewer).
    size = entry.blocks.size
    covered = _covering_blocks(spans, size, entry.size)
    wanted = {i for lo, hi in covered for i in range(lo // size, -(-hi // size))}
    read = dict(zip(result.block_indices, result.blocks or (), strict=True))
    expected = sum(hi - lo for lo, hi in covered)
    if read.keys() != wanted or result.size != expected:
        return (
            f"{entry.path}: {len(read)} blocks ({result.size} bytes) read of the "
            f"{len(wanted)} ({expected} bytes) that hold this rank's part"
        )
    return store.check_some_blocks(entry, read)


def _spans(
    path: Path, targets: Sequence[tuple[TensorSpec, torch.Tensor | Part]]
) -> list[tuple[int, int]] | None:
    """The bytes of ``path`` to read when some destinations are parts (its header, the tensors
    and the parts' rows; a part's columns need the whole tensor), or None: the whole file."""
    if not any(isinstance(dest, Part) for _, dest in targets):
        return None
    with path.open("rb", buffering=0) as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
    wanted = [(0, 8 + length)]
    for spec, dest in targets:
        read = dest.rows_of(spec) if isinstance(dest, Part) and dest.dim == 0 else spec
        wanted.append((read.begin, read.end))
    return wanted


def _plan(path: Path, destination: Destination) -> list[tuple[TensorSpec, torch.Tensor | Part]]:
    targets = []
    unexpected = []
    for spec in read_header(path):
        dest = destination(spec)
        if dest is None:
            unexpected.append(spec.name)
            continue
        if isinstance(dest, Part):
            expected, shape = dest.shape_of(spec.shape), tuple(dest.dest.shape)
            of_part = f" (its part {list(expected)})"
        else:
            expected, shape, of_part = spec.shape, tuple(dest.shape), ""
        if shape != expected:
            raise WeightsError(
                f"tensor {spec.name!r} has shape {list(spec.shape)}{of_part}, "
                f"the model expects {list(shape)}"
            )
        targets.append((spec, dest))
    if unexpected:
        raise WeightsError(f"unexpected tensors {sorted(unexpected)[:5]}")
    return targets


def _raise_if_tampered(
    root: Path,
    entry: store.FileEntry,
    version_id: str,
    verify: bool,
    hash_threads: int | None,
) -> None:
    """A shard that cannot be used may have been tampered with: if so, that is the error."""
    if not verify:
        return
    problems = store.verify_files(root, [entry], threads=hash_threads)
    if problems:
        raise store.VerificationError(version_id, problems)
