"""The model store: immutable, content-addressed model versions.

Layout (see DESIGN.md, "Model store contract")::

    <store>/<model>/versions/<version_id>/manifest.json
    <store>/<model>/versions/<version_id>/<model files>
    <store>/<model>/.incoming-<random>/          (a publish in progress; never read)

``manifest.json`` holds the canonical JSON of ``{"format": 1, "files": [{"path", "sha256",
"size"}, ...]}`` with files sorted by path. Only content goes in: no model name, no mtimes, no
publish time, so identical content always gets the same ``version_id`` (the sha256 of those bytes)
wherever and whenever it is published.

This module only uses the standard library, so ``publish`` and ``verify`` stay fast to start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
VERSIONS_DIR = "versions"
INCOMING_PREFIX = ".incoming-"
SHORT_ID_LEN = 12
# Large sequential reads: on NFS this keeps the pipe full without mmap page faults.
CHUNK_SIZE = 16 * 1024 * 1024
# An .incoming dir untouched this long belongs to a publish that died; the next publish removes it.
STALE_INCOMING_SECONDS = 3600.0

_VERSION_ID_RE = re.compile(r"^[0-9a-f]{64}$")
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


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a version, as listed in its manifest."""

    path: str
    size: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True, slots=True)
class Manifest:
    files: tuple[FileEntry, ...]

    def canonical_bytes(self) -> bytes:
        doc = {
            "files": [f.as_json() for f in sorted(self.files, key=lambda f: f.path)],
            "format": MANIFEST_FORMAT,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @property
    def version_id(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("format") != MANIFEST_FORMAT:
                raise StoreError(f"unsupported manifest format {doc.get('format')!r}")
            files = tuple(
                FileEntry(path=str(f["path"]), size=int(f["size"]), sha256=str(f["sha256"]))
                for f in doc["files"]
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"malformed manifest: {exc}") from exc
        for entry in files:
            _check_relative_path(entry.path)
        return cls(files=files)


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


def verify_version(store: Path, model: str, version_id: str) -> list[str]:
    """Re-hash every file of a version; return the problems (empty when the version is intact).

    Each problem names its file: missing, extra (not in the manifest) or mismatched.
    """
    root = version_dir(store, model, version_id)
    if not root.is_dir():
        raise VersionNotFoundError(f"{root} does not exist")
    try:
        manifest = read_manifest(store, model, version_id)
    except VerificationError as exc:
        return exc.problems
    problems: list[str] = []
    listed = {e.path for e in manifest.files}
    for entry in manifest.files:
        path = root / entry.path
        if not path.is_file():
            problems.append(f"{entry.path}: missing")
            continue
        problem = check_entry(entry, *hash_file(path))
        if problem:
            problems.append(problem)
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
) -> str:
    """Publish the files under ``src`` as a new immutable version of ``model``; return its id.

    Idempotent: identical content yields the same id and leaves the existing version untouched.
    Crash-safe: everything is written and fsynced under ``.incoming-<random>`` and only then
    renamed into ``versions/``, so readers never see a half-written version.
    ``on_file_copied`` is called after each file is copied (progress reporting, tests).
    """
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
    try:
        entries = []
        for rel in files:
            entries.append(_copy_hashed(src, incoming, rel))
            if on_file_copied is not None:
                on_file_copied(rel)
        manifest = Manifest(files=tuple(entries))
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
        if incoming.exists():
            _remove_tree(incoming)


def remove_stale_incoming(base: Path, max_age: float = STALE_INCOMING_SECONDS) -> list[Path]:
    """Delete ``.incoming-*`` dirs left by publishes that died; recent ones may still be live."""
    removed = []
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
                _remove_tree(child)
                removed.append(child)
    return removed


def _check_relative_path(path: str) -> None:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or path != pure.as_posix():
        raise StoreError(f"manifest path {path!r} is not a plain relative path")


def _copy_hashed(src_root: Path, dst_root: Path, rel: str) -> FileEntry:
    """Copy one file in large chunks, hashing on the way, and fsync it."""
    dst = dst_root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with (src_root / rel).open("rb", buffering=0) as fin, dst.open("xb", buffering=0) as fout:
        while chunk := fin.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
            fout.write(chunk)
        os.fsync(fout.fileno())
    return FileEntry(path=rel, size=size, sha256=digest.hexdigest())


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


def _remove_tree(path: Path) -> None:
    # Read-only files are fine: unlinking needs a writable directory, and ours are.
    shutil.rmtree(path, ignore_errors=True)
