"""The node-local cache of verified versions (``metalserve serve --cache-dir``).

Every (re)start and reload used to stream all shards from the shared store. The cache keeps
versions on the node (local NVMe in production), in the store's own layout, so a cached version is
loaded exactly as from the store, and verified exactly as from the store: a cache hit saves the
network, never the verification.

* Adding: after a replica loaded a version from the store, a background thread copies it into
  ``<model>/.incoming-<random>``, verifies every block against the manifest and renames it to
  ``<model>/versions/<id>``: a version is visible only complete and verified. A crash mid-write
  leaves an ``.incoming-*`` directory that the next add removes once it is an hour old; two
  replicas adding the same version both copy, one rename wins, the other discards its copy.
* Using: ``acquire`` takes a shared ``flock`` on ``<model>/.locks/<id>`` and returns a lease;
  the replica keeps the lease of the version it serves. A cached copy that fails verification is
  dropped and the version is loaded from the store again (``drop``), never served.
* Evicting: to fit a new version under ``max_bytes``, the least recently acquired versions go
  first (a lease touches its lock file). Never evicted: a version any process holds a lease on
  (an exclusive non-blocking ``flock`` fails), and the versions listed in ``<root>/protected``
  (one version id per line: what the host's rollout record names as current, previous or
  target). A version that cannot fit is not cached (logged); nothing else is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from metalserve import store

log = logging.getLogger(__name__)

LOCKS_DIR = ".locks"
PROTECTED_FILE = "protected"
DELETING_PREFIX = ".deleting-"


@dataclass
class Lease:
    """A shared lock on one cached version: while held, no eviction removes it."""

    root: Path  # the cache, as a store root for the loader
    version_id: str
    _fd: int

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


@dataclass(frozen=True)
class CachedVersion:
    version_id: str
    size: int
    last_used: float


class VersionCache:
    """The cache under ``root`` (shared by every replica of a host), at most ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    # --- using ----------------------------------------------------------------------------

    def acquire(self, model: str, version_id: str) -> Lease | None:
        """A lease on the cached ``version_id``, or None when it is not cached (or being
        evicted right now)."""
        if not store.version_dir(self.root, model, version_id).is_dir():
            return None
        fd = self._lock_fd(model, version_id)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # Evicted between the check and the lock: a miss.
        if not store.version_dir(self.root, model, version_id).is_dir():
            os.close(fd)
            return None
        os.utime(fd)  # last used: the eviction order
        return Lease(self.root, version_id, fd)

    def drop(self, model: str, version_id: str) -> None:
        """Remove a cached version (a corrupted one: the caller holds no lease on it any more)."""
        self._remove(model, version_id)
        log.warning("dropped the cached copy of %s", version_id[: store.SHORT_ID_LEN])

    # --- adding ---------------------------------------------------------------------------

    def add(self, source: Path, model: str, version_id: str) -> bool:
        """Copy ``version_id`` from the store ``source`` into the cache, verified; True once it
        is cached (also when it already was), False when it cannot fit."""
        target = store.version_dir(self.root, model, version_id)
        if target.is_dir():
            return True
        manifest = store.read_manifest(source, model, version_id)
        needed = sum(entry.size for entry in manifest.files)
        base = store.model_dir(self.root, model)
        (base / "versions").mkdir(parents=True, exist_ok=True)
        store.remove_stale_incoming(base)
        for doomed in base.glob(f"{DELETING_PREFIX}*"):  # evictions that died midway
            store.remove_tree(doomed)
        if not self._make_room(model, needed, keep=version_id):
            log.warning(
                "not caching %s: %.2f GiB does not fit the cache's %.2f GiB beside the versions "
                "in use or protected",
                version_id[: store.SHORT_ID_LEN],
                needed / 2**30,
                self.max_bytes / 2**30,
            )
            return False
        incoming = base / f"{store.INCOMING_PREFIX}{secrets.token_hex(8)}"
        try:
            shutil.copytree(store.version_dir(source, model, version_id), incoming)
            problems = store.verify_files(incoming, manifest.files)
            if problems:
                raise store.VerificationError(version_id, problems)
            if (incoming / store.MANIFEST_NAME).read_bytes() != manifest.canonical_bytes():
                raise store.VerificationError(version_id, [f"{store.MANIFEST_NAME}: changed"])
            _fsync_tree(incoming)
            try:
                incoming.rename(target)
            except OSError:
                if not target.is_dir():  # else a concurrent replica cached it first
                    raise
            return True
        finally:
            if incoming.exists():
                store.remove_tree(incoming)

    # --- listing and evicting -------------------------------------------------------------

    def versions(self, model: str) -> list[CachedVersion]:
        """The cached versions of ``model``, least recently used first."""
        found = []
        for version_id in store.list_versions(self.root, model):
            try:
                manifest = store.read_manifest(self.root, model, version_id)
            except store.StoreError:
                size = 0  # unreadable: counts nothing, evicted first
            else:
                size = sum(entry.size for entry in manifest.files)
            lock = self._lock_path(model, version_id)
            last_used = lock.stat().st_mtime if lock.exists() else 0.0
            found.append(CachedVersion(version_id, size, last_used))
        return sorted(found, key=lambda v: v.last_used)

    def protected(self) -> set[str]:
        """The version ids of ``<root>/protected``."""
        try:
            text = (self.root / PROTECTED_FILE).read_text()
        except FileNotFoundError:
            return set()
        return {line.strip() for line in text.splitlines() if line.strip()}

    def set_protected(self, version_ids: list[str]) -> None:
        """Replace the list of protected versions (written whole, then renamed into place)."""
        self.root.mkdir(parents=True, exist_ok=True)
        staged = self.root / f".{PROTECTED_FILE}-{secrets.token_hex(4)}"
        staged.write_text("".join(f"{v}\n" for v in sorted(set(version_ids))))
        staged.replace(self.root / PROTECTED_FILE)

    def _make_room(self, model: str, needed: int, keep: str) -> bool:
        if needed > self.max_bytes:
            return False
        cached = self.versions(model)
        used = sum(v.size for v in cached)
        protected = self.protected() | {keep}
        for victim in cached:
            if used + needed <= self.max_bytes:
                break
            if victim.version_id in protected or not self._evict(model, victim.version_id):
                continue
            used -= victim.size
            log.info(
                "evicted %s from the cache (%.2f GiB, least recently used)",
                victim.version_id[: store.SHORT_ID_LEN],
                victim.size / 2**30,
            )
        return used + needed <= self.max_bytes

    def _evict(self, model: str, version_id: str) -> bool:
        """Remove a version no process holds a lease on; False if one does."""
        fd = self._lock_fd(model, version_id)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        else:
            self._remove(model, version_id)
            return True
        finally:
            os.close(fd)

    def _remove(self, model: str, version_id: str) -> None:
        # Renamed away first: the version disappears at once, whatever the deletion takes.
        directory = store.version_dir(self.root, model, version_id)
        doomed = store.model_dir(self.root, model) / f"{DELETING_PREFIX}{secrets.token_hex(8)}"
        with contextlib.suppress(FileNotFoundError):
            directory.rename(doomed)
            store.remove_tree(doomed)

    def _lock_path(self, model: str, version_id: str) -> Path:
        return store.model_dir(self.root, model) / LOCKS_DIR / version_id

    def _lock_fd(self, model: str, version_id: str) -> int:
        path = self._lock_path(model, version_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root``: the rename publishes durable bytes."""
    for path in [*root.rglob("*"), root]:
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
