"""The model store: immutable, content-addressed model versions.

Layout (see DESIGN.md, "Model store contract")::

    <store>/<model>/versions/<version_id>/manifest.json
    <store>/<model>/versions/<version_id>/<model files>
    <store>/<model>/.incoming-<random>/          (a publish in progress; never read)

``manifest.json`` holds the canonical JSON (sorted keys, no spaces) of ``{"format": 3, "files":
[{"path", "size", "sha256", "blocks": {"size", "blake3": [...]}}, ...]}`` with files sorted by
path: besides the whole file's sha256, every file lists a digest of each of its fixed-size blocks
(``BLOCK_SIZE`` bytes, the last one shorter), so that one file can be verified on many cores at
once. The block digests are inside the manifest, so the version id covers them: a file whose size
and every block match is proven as strongly as by its whole-file hash.

The formats differ only in the block digests' algorithm (the key that lists them):

- 3 (what ``publish`` writes): BLAKE3 (256-bit, the ``blake3`` package). It costs about a quarter
  of SHA-256's CPU time per byte, and verifying warm weights is CPU-bound: with SHA-256 blocks
  hashing alone used the whole loading budget of a 16-core GPU host (BENCHMARKS.md).
- 2: SHA-256 blocks.
- 1 (``{"format": 1, "files": [{"path", "sha256", "size"}, ...]}``): no blocks; whole-file
  hashes only.

Older formats are still read, verified and loaded; their version ids do not change. Only content
goes in: no model name, no mtimes, no publish time, so identical content always gets the same
``version_id`` (the sha256 of those bytes) wherever and whenever it is published in the same
format.

This module needs only the standard library and ``blake3`` (a small native extension), so
``publish`` and ``verify`` stay fast to start.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import blake3

MANIFEST_NAME = "manifest.json"
# What publish writes; read_manifest also reads the older formats.
MANIFEST_FORMAT = 3
MANIFEST_FORMATS = (1, 2, 3)
# The algorithm of each format's block digests (format 1 has no blocks).
BLOCK_ALGORITHMS = {2: "sha256", 3: "blake3"}
# Block size of the per-block digests publish records. 16 MiB: one block hashes in a few ms on
# one core (so scheduling costs nothing), a 2 GiB shard gives 128 blocks to spread over the cores,
# the loader needs one 16 MiB host buffer per block being hashed, and the manifest grows by about
# 4.3 kB per GiB of files (about 0.6 MB for 140 GB of weights).
BLOCK_SIZE = 16 * 1024 * 1024
# Bounds on a manifest's block size: the loader allocates buffers of that size.
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1024**3
VERSIONS_DIR = "versions"
INCOMING_PREFIX = ".incoming-"
SHORT_ID_LEN = 12
# Large sequential reads: on NFS this keeps the pipe full without mmap page faults.
CHUNK_SIZE = 16 * 1024 * 1024
# An .incoming dir untouched this long belongs to a publish that died; the next publish removes it.
STALE_INCOMING_SECONDS = 3600.0

_VERSION_ID_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA256_RE = _VERSION_ID_RE
_BLOCK_DIGEST_RE = _VERSION_ID_RE  # both block algorithms give 256-bit digests
_PREFIX_RE = re.compile(r"^[0-9a-f]+$")
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(Exception):
    """Base class for every model-store failure; the message is meant for operators."""


class VersionNotFoundError(StoreError):
    """No version matches the requested id or prefix."""


class AmbiguousVersionError(StoreError):
    """A short prefix matches more than one version."""


class VerificationError(StoreError):
    """A version's files do not match its manifest."""

    def __init__(self, version_id: str, problems: list[str]) -> None:
        self.version_id = version_id
        self.problems = problems
        super().__init__(
            f"version {version_id[:SHORT_ID_LEN]} failed verification: " + "; ".join(problems)
        )

    def __reduce__(self) -> tuple[type[VerificationError], tuple[str, list[str]]]:
        # Raised in the engine's process (``metalserve.core``), re-raised in the API's.
        return (VerificationError, (self.version_id, self.problems))


@dataclass(frozen=True, slots=True)
class Blocks:
    """The per-block digests of one file: block ``i`` is bytes ``[i * size, (i + 1) * size)``,
    hashed with ``algorithm`` (one of ``BLOCK_ALGORITHMS``' values)."""

    size: int
    digests: tuple[str, ...]
    algorithm: str

    def span(self, index: int, file_size: int) -> tuple[int, int]:
        """Byte range ``[begin, end)`` of block ``index`` in a file of ``file_size`` bytes."""
        begin = index * self.size
        return begin, min(begin + self.size, file_size)

    def as_json(self) -> dict[str, Any]:
        return {self.algorithm: list(self.digests), "size": self.size}


def block_count(file_size: int, block_size: int) -> int:
    """Blocks of ``block_size`` that hold ``file_size`` bytes (an empty file has none)."""
    return -(-file_size // block_size)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a version, as listed in its manifest (``blocks`` is None in format 1)."""

    path: str
    size: int
    sha256: str
    blocks: Blocks | None = None

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"path": self.path, "sha256": self.sha256, "size": self.size}
        if self.blocks is not None:
            doc["blocks"] = self.blocks.as_json()
        return doc


@dataclass(frozen=True, slots=True)
class Manifest:
    """A version's file list. Formats 2 and 3 list block digests for every file; 1 for none."""

    files: tuple[FileEntry, ...]
    format: int = MANIFEST_FORMAT

    def __post_init__(self) -> None:
        if self.format not in MANIFEST_FORMATS:
            raise StoreError(
                f"unsupported manifest format {self.format!r} "
                f"(this metalserve reads formats {', '.join(map(str, MANIFEST_FORMATS))})"
            )
        seen: set[str] = set()
        for entry in self.files:
            _check_entry_fields(entry, self.format)
            if entry.path in seen:
                raise StoreError(f"malformed manifest: {entry.path!r} is listed twice")
            seen.add(entry.path)

    def canonical_bytes(self) -> bytes:
        doc = {
            "files": [f.as_json() for f in sorted(self.files, key=lambda f: f.path)],
            "format": self.format,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @property
    def version_id(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Parse and validate a manifest; every problem is a ``StoreError`` naming it."""
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise StoreError(f"malformed manifest: {exc}") from exc
        if not isinstance(doc, dict):
            raise StoreError("malformed manifest: not a JSON object")
        fmt = doc.get("format")
        if type(fmt) is not int or fmt not in MANIFEST_FORMATS:
            raise StoreError(
                f"unsupported manifest format {fmt!r} "
                f"(this metalserve reads formats {', '.join(map(str, MANIFEST_FORMATS))})"
            )
        files = doc.get("files")
        if not isinstance(files, list):
            raise StoreError("malformed manifest: 'files' is not a list")
        algorithm = BLOCK_ALGORITHMS.get(fmt, "")
        return cls(
            files=tuple(_parse_entry(number, f, algorithm) for number, f in enumerate(files)),
            format=fmt,
        )


def _parse_entry(number: int, doc: object, algorithm: str) -> FileEntry:
    if not isinstance(doc, dict):
        raise StoreError(f"malformed manifest: files[{number}] is not an object")
    path = doc.get("path")
    if not isinstance(path, str):
        raise StoreError(f"malformed manifest: files[{number}] has no string 'path'")
    for key in ("size", "sha256"):
        if key not in doc:
            raise StoreError(f"malformed manifest: {path}: no {key!r}")
    blocks = None
    if "blocks" in doc:
        raw = doc["blocks"]
        if (
            not algorithm
            or not isinstance(raw, dict)
            or not _is_int(raw.get("size"))
            or not isinstance(raw.get(algorithm), list)
        ):
            shape = f'{{"size": <int>, "{algorithm}": [<hex digest>, ...]}}'
            raise StoreError(
                f"malformed manifest: {path}: 'blocks' must be "
                + (shape if algorithm else "absent (format 1 has no block digests)")
            )
        blocks = Blocks(size=raw["size"], digests=tuple(raw[algorithm]), algorithm=algorithm)
    # Checked by Manifest.__post_init__ (types too: a manifest built in code gets the same checks).
    return FileEntry(path=path, size=doc["size"], sha256=doc["sha256"], blocks=blocks)


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool, not float


def _check_entry_fields(entry: FileEntry, fmt: int) -> None:
    """Validate one entry for manifest format ``fmt``; the message names the file and problem."""
    _check_relative_path(entry.path)
    where = f"malformed manifest: {entry.path}"
    if not _is_int(entry.size) or entry.size < 0:
        raise StoreError(f"{where}: size {entry.size!r} is not a non-negative integer")
    if not isinstance(entry.sha256, str) or not _SHA256_RE.match(entry.sha256):
        raise StoreError(f"{where}: sha256 {entry.sha256!r} is not 64 lowercase hex digits")
    blocks = entry.blocks
    if fmt == 1:
        if blocks is not None:
            raise StoreError(f"{where}: format 1 manifests have no 'blocks' (formats 2-3 do)")
        return
    if blocks is None:
        raise StoreError(f"{where}: no 'blocks' (format {fmt} lists block digests for every file)")
    if blocks.algorithm != BLOCK_ALGORITHMS[fmt]:
        raise StoreError(
            f"{where}: {blocks.algorithm!r} block digests in a format {fmt} manifest "
            f"(format {fmt} blocks are {BLOCK_ALGORITHMS[fmt]})"
        )
    if not _is_int(blocks.size) or not MIN_BLOCK_SIZE <= blocks.size <= MAX_BLOCK_SIZE:
        raise StoreError(
            f"{where}: block size {blocks.size!r} is not an integer in "
            f"{MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}"
        )
    expected = block_count(entry.size, blocks.size)
    if len(blocks.digests) != expected:
        raise StoreError(
            f"{where}: {len(blocks.digests)} block digests, but {entry.size} bytes in blocks of "
            f"{blocks.size} make {expected}"
        )
    for index, digest in enumerate(blocks.digests):
        if not isinstance(digest, str) or not _BLOCK_DIGEST_RE.match(digest):
            raise StoreError(
                f"{where}: block {index} digest {digest!r} is not 64 lowercase hex digits"
            )


def model_dir(store: Path, model: str) -> Path:
    if not _MODEL_NAME_RE.match(model):
        raise StoreError(f"invalid model name {model!r} (letters, digits, '.', '_', '-')")
    return store / model


def versions_dir(store: Path, model: str) -> Path:
    return model_dir(store, model) / VERSIONS_DIR


def version_dir(store: Path, model: str, version_id: str) -> Path:
    return versions_dir(store, model) / version_id


def list_versions(store: Path, model: str) -> list[str]:
    """Every published version id of ``model`` (sorted). ``.incoming-*`` dirs are never listed."""
    base = versions_dir(store, model)
    try:
        children = list(base.iterdir())
    except FileNotFoundError:
        return []
    return sorted(c.name for c in children if _VERSION_ID_RE.match(c.name) and c.is_dir())


def resolve_version(store: Path, model: str, ref: str) -> str:
    """Turn a full version id or a unique prefix of at least 12 hex digits into the full id.

    The rolling-update playbook calls this through ``metalserve verify`` so that inventories may
    carry either form.
    """
    ref = ref.strip().lower()
    if not _PREFIX_RE.match(ref) or len(ref) > 64:
        raise VersionNotFoundError(f"{ref!r} is not a version id (hex digits expected)")
    if len(ref) < SHORT_ID_LEN:
        raise VersionNotFoundError(
            f"version prefix {ref!r} is too short: give at least {SHORT_ID_LEN} hex digits"
        )
    matches = [v for v in list_versions(store, model) if v.startswith(ref)]
    if not matches:
        raise VersionNotFoundError(
            f"model {model!r} has no version {ref!r} in {versions_dir(store, model)}"
        )
    if len(matches) > 1:
        listed = ", ".join(m[: len(ref) + 4] for m in matches)
        raise AmbiguousVersionError(f"version prefix {ref!r} is ambiguous: matches {listed}")
    return matches[0]


def read_manifest(store: Path, model: str, version_id: str) -> Manifest:
    """Load a version's manifest and check that it really hashes to the directory's name."""
    path = version_dir(store, model, version_id) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise VerificationError(version_id, [f"{MANIFEST_NAME}: missing"]) from exc
    # The file itself must be the canonical bytes: its sha256 is the version id.
    actual = hashlib.sha256(data).hexdigest()
    if actual != version_id:
        raise VerificationError(
            version_id,
            [f"{MANIFEST_NAME}: hashes to {actual[:SHORT_ID_LEN]}, not to the version id"],
        )
    return Manifest.parse(data)


def iter_files(root: Path) -> Iterator[str]:
    """Relative POSIX paths of every regular file under ``root`` (symlinks are followed)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if full.is_file():
                yield full.relative_to(root).as_posix()


def read_hashed(path: Path, chunk_size: int = CHUNK_SIZE) -> tuple[bytes, str]:
    """Read a whole file in large sequential chunks (no mmap), hashing while reading."""
    digest = hashlib.sha256()
    chunks: list[bytes] = []
    with path.open("rb", buffering=0) as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
            chunks.append(chunk)
    return b"".join(chunks), digest.hexdigest()


def hash_file(path: Path, chunk_size: int = CHUNK_SIZE) -> tuple[int, str]:
    """Size and sha256 of a file, streaming (constant memory)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb", buffering=0) as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def check_entry(entry: FileEntry, size: int, sha256: str) -> str | None:
    """The problem with one file (for messages), or None when it matches the manifest."""
    if size != entry.size:
        return f"{entry.path}: size {size} != manifest {entry.size}"
    if sha256 != entry.sha256:
        return f"{entry.path}: sha256 {sha256[:16]}… != manifest {entry.sha256[:16]}…"
    return None


def check_blocks(entry: FileEntry, size: int, digests: Sequence[str]) -> str | None:
    """Like ``check_entry`` for a file verified block by block (``digests`` in block order).

    The message starts like check_entry's (``<path>: <algorithm> <hex>… != manifest <hex>…``)
    and names the first bad block, its byte range and how many others differ.
    """
    assert entry.blocks is not None
    if size != entry.size:
        return f"{entry.path}: size {size} != manifest {entry.size}"
    expected = entry.blocks.digests
    if len(digests) != len(expected):
        return f"{entry.path}: {len(digests)} blocks read, manifest lists {len(expected)}"
    return check_some_blocks(entry, dict(enumerate(digests)))


def check_some_blocks(entry: FileEntry, digests: Mapping[int, str]) -> str | None:
    """Like ``check_blocks`` for the blocks of a file that were read (block index -> digest):
    a reader of parts of a file verifies what it read (its size is checked apart)."""
    assert entry.blocks is not None
    expected = entry.blocks.digests
    outside = [i for i in digests if not 0 <= i < len(expected)]
    if outside:
        return f"{entry.path}: block {outside[0]} read, manifest lists {len(expected)}"
    bad = sorted(i for i, got in digests.items() if got != expected[i])
    if not bad:
        return None
    first = bad[0]
    begin, end = entry.blocks.span(first, entry.size)
    others = f"; {len(bad) - 1} more of its {len(expected)} blocks differ" if len(bad) > 1 else ""
    return (
        f"{entry.path}: {entry.blocks.algorithm} {digests[first][:16]}… "
        f"!= manifest {expected[first][:16]}… "
        f"in block {first} (bytes {begin}..{end - 1}){others}"
    )


def default_threads() -> int:
    """Hashing threads: one per core this process may use (hashlib releases the GIL)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))  # not the host's count under a cpuset
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def blake3_hex(data: bytes | memoryview) -> str:
    # One thread per block (blake3's default): the callers hash many blocks at once, and blake3
    # releases the GIL for large inputs as hashlib does.
    return blake3.blake3(data).hexdigest()


BLOCK_HASHERS: dict[str, Callable[[bytes | memoryview], str]] = {
    "sha256": sha256_hex,
    "blake3": blake3_hex,
}


def hash_span(path: Path, begin: int, end: int, algorithm: str) -> tuple[int, str]:
    """Bytes read and ``algorithm`` digest of ``path[begin:end]`` (fewer bytes if the file is
    shorter)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = _pread_full(fd, end - begin, begin)
    finally:
        os.close(fd)
    return len(data), BLOCK_HASHERS[algorithm](data)


def verify_files(
    root: Path, entries: Iterable[FileEntry], *, threads: int | None = None
) -> list[str]:
    """Hash the files ``entries`` under ``root`` on a thread pool; return the problems.

    Files with block digests are verified block by block, every block a task of its own, so one
    large file is verified on every core; format 1 files are hashed whole, one task each.
    Missing files are reported as missing. Problems come in the order of ``entries``.
    """
    checks: list[Callable[[], str | None]] = []
    with ThreadPoolExecutor(threads or default_threads(), "metalserve-verify") as pool:
        for entry in entries:
            path = root / entry.path
            if not path.is_file():
                checks.append(functools.partial(_given, f"{entry.path}: missing"))
                continue
            size = path.stat().st_size
            if size != entry.size:
                # A size mismatch needs no hashing (the block layout would not even match).
                checks.append(functools.partial(check_entry, entry, size, entry.sha256))
            elif entry.blocks is None:
                checks.append(
                    functools.partial(_whole_problem, entry, pool.submit(hash_file, path))
                )
            else:
                blocks = entry.blocks
                spans = [
                    pool.submit(hash_span, path, *blocks.span(i, entry.size), blocks.algorithm)
                    for i in range(len(blocks.digests))
                ]
                checks.append(functools.partial(_block_problem, entry, spans))
        return [problem for check in checks if (problem := check())]


def _given(problem: str | None) -> str | None:
    return problem


def _whole_problem(entry: FileEntry, hashed: Future[tuple[int, str]]) -> str | None:
    return check_entry(entry, *hashed.result())


def _block_problem(entry: FileEntry, spans: list[Future[tuple[int, str]]]) -> str | None:
    results = [f.result() for f in spans]
    size = sum(count for count, _ in results)
    return check_blocks(entry, size, [digest for _, digest in results])


def verify_version(
    store: Path, model: str, version_id: str, *, threads: int | None = None
) -> list[str]:
    """Re-hash every file of a version; return the problems (empty when the version is intact).

    Each problem names its file: missing, extra (not in the manifest) or mismatched. Files with
    block digests (formats 2-3) are hashed block by block on ``threads`` threads (default: one per
    core); format 1 files whole, several files at once.
    """
    root = version_dir(store, model, version_id)
    if not root.is_dir():
        raise VersionNotFoundError(f"{root} does not exist")
    try:
        manifest = read_manifest(store, model, version_id)
    except VerificationError as exc:
        return exc.problems
    listed = {e.path for e in manifest.files}
    problems = verify_files(root, manifest.files, threads=threads)
    problems.extend(
        f"{rel}: extra file, not in the manifest"
        for rel in iter_files(root)
        if rel != MANIFEST_NAME and rel not in listed
    )
    return problems


def publish(
    src: Path,
    store: Path,
    model: str,
    *,
    on_file_copied: Callable[[str], None] | None = None,
    manifest_format: int = MANIFEST_FORMAT,
    block_size: int = BLOCK_SIZE,
    threads: int | None = None,
) -> str:
    """Publish the files under ``src`` as a new immutable version of ``model``; return its id.

    Idempotent: identical content yields the same id and leaves the existing version untouched.
    Crash-safe: everything is written and fsynced under ``.incoming-<random>`` and only then
    renamed into ``versions/``, so readers never see a half-written version.
    ``on_file_copied`` is called after each file is copied (progress reporting, tests).
    Formats 2 and 3 (the default) record block digests of ``block_size`` bytes, hashed on
    ``threads`` threads beside the copy; older formats are for tests and comparisons.
    """
    if manifest_format not in MANIFEST_FORMATS:
        raise StoreError(f"unsupported manifest format {manifest_format!r}")
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise StoreError(f"block size {block_size} is not in {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")
    if not src.is_dir():
        raise StoreError(f"{src} is not a directory")
    files = [rel for rel in iter_files(src) if rel != MANIFEST_NAME]
    if not files:
        raise StoreError(f"{src} holds no files to publish")
    base = model_dir(store, model)
    versions = base / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    remove_stale_incoming(base)

    incoming = base / f"{INCOMING_PREFIX}{secrets.token_hex(8)}"
    incoming.mkdir()
    workers = threads or default_threads()
    pool = ThreadPoolExecutor(workers, "metalserve-publish")
    algorithm = BLOCK_ALGORITHMS.get(manifest_format)  # None: format 1, no blocks
    try:
        entries = []
        for rel in files:
            entries.append(
                _copy_hashed(src, incoming, rel, pool, 2 * workers, block_size, algorithm)
            )
            if on_file_copied is not None:
                on_file_copied(rel)
        manifest = Manifest(files=tuple(entries), format=manifest_format)
        version_id = manifest.version_id
        _write_synced(incoming / MANIFEST_NAME, manifest.canonical_bytes())
        for directory in sorted({(incoming / rel).parent for rel in files}, reverse=True):
            _fsync_dir(directory)
        _fsync_dir(incoming)
        target = versions / version_id
        if target.exists():
            # Same content already published: never touch an existing version.
            return version_id
        _make_read_only(incoming)
        try:
            incoming.rename(target)
        except OSError:
            # A concurrent publisher of the same content won the race.
            if target.is_dir():
                return version_id
            raise
        _fsync_dir(versions)
        return version_id
    finally:
        pool.shutdown(cancel_futures=True)
        if incoming.exists():
            remove_tree(incoming)


def stale_incoming(base: Path, max_age: float = STALE_INCOMING_SECONDS) -> list[Path]:
    """The ``.incoming-*`` dirs under ``base`` untouched for ``max_age`` seconds: publishes that
    died (recent ones may still be live)."""
    found = []
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        for child in base.iterdir():
            if not child.name.startswith(INCOMING_PREFIX):
                continue
            try:
                age = now - child.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > max_age:
                found.append(child)
    return found


def remove_stale_incoming(base: Path, max_age: float = STALE_INCOMING_SECONDS) -> list[Path]:
    """Delete the dirs of publishes that died (``stale_incoming``)."""
    removed = stale_incoming(base, max_age)
    for path in removed:
        remove_tree(path)
    return removed


def _check_relative_path(path: str) -> None:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or path != pure.as_posix():
        raise StoreError(f"manifest path {path!r} is not a plain relative path")


def _copy_hashed(
    src_root: Path,
    dst_root: Path,
    rel: str,
    pool: ThreadPoolExecutor,
    window: int,
    block_size: int,
    algorithm: str | None,
) -> FileEntry:
    """Copy one file and fsync it, hashing the whole file on the way and, with an
    ``algorithm``, every ``block_size`` block of it on ``pool`` (a few blocks in flight, so
    memory stays bounded)."""
    dst = dst_root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    read_size = block_size if algorithm else CHUNK_SIZE
    blocks: list[Future[str]] = []
    with (src_root / rel).open("rb", buffering=0) as fin, dst.open("xb", buffering=0) as fout:
        # Whole blocks (short reads are completed), so that the block boundaries are exact.
        while chunk := _read_full(fin, read_size):
            digest.update(chunk)
            size += len(chunk)
            fout.write(chunk)
            if algorithm:
                blocks.append(pool.submit(BLOCK_HASHERS[algorithm], chunk))
                if len(blocks) > window:
                    blocks[-window - 1].result()  # bounds the chunks held by queued tasks
        os.fsync(fout.fileno())
    hashed = Blocks(block_size, tuple(f.result() for f in blocks), algorithm) if algorithm else None
    return FileEntry(path=rel, size=size, sha256=digest.hexdigest(), blocks=hashed)


def _read_full(fh: io.FileIO, size: int) -> bytes:
    """``size`` bytes, or fewer only at the end of the file (short reads happen, e.g. on NFS)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = fh.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _pread_full(fd: int, size: int, offset: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = os.pread(fd, size - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("xb", buffering=0) as fh:
        fh.write(data)
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_read_only(root: Path) -> None:
    """Files of a version are read-only: immutability should not depend on good manners."""
    for rel in iter_files(root):
        path = root / rel
        path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222)


def remove_tree(path: Path) -> None:
    # Read-only files are fine: unlinking needs a writable directory, and ours are.
    shutil.rmtree(path, ignore_errors=True)
