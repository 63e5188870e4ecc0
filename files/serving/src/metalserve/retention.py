"""Store retention (``metalserve gc``): which versions of a model to keep, and deleting the rest.

Kept: the ``keep_last`` newest versions (by publish time, the manifest's mtime) and every
protected version (what hosts run, ran or are rolling to, and what inventories pin: the caller
names them). Everything else goes, and so do staging directories of publishes that died
(``.incoming-*``, by the store's own staleness rule) and leftovers of an interrupted gc.

A version is deleted by first renaming it out of ``versions/`` (one atomic step: readers and
``resolve`` never see half of it), then removing the renamed tree.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from metalserve import store

DELETING_PREFIX = ".deleting-"


@dataclass(frozen=True)
class VersionFate:
    version_id: str
    published: float  # the manifest's mtime (seconds since the epoch)
    size: int  # bytes of its files and manifest
    keep: bool
    reason: str


@dataclass(frozen=True)
class Leftover:
    """A directory that holds no version: a dead publish's staging dir or an interrupted gc's."""

    path: Path
    size: int
    age: float


@dataclass(frozen=True)
class Plan:
    model: str
    versions: tuple[VersionFate, ...]
    leftovers: tuple[Leftover, ...]

    @property
    def freed(self) -> int:
        """Bytes the plan removes."""
        gone = sum(v.size for v in self.versions if not v.keep)
        return gone + sum(left.size for left in self.leftovers)


def plan(
    store_root: Path,
    model: str,
    *,
    keep_last: int,
    protected: Iterable[str] = (),
    incoming_age: float = store.STALE_INCOMING_SECONDS,
) -> Plan:
    """What gc would do. ``protected`` holds full ids or unique prefixes of this model's
    versions; one that names no version raises ``VersionNotFoundError``: a typo must not
    leave a running version unprotected."""
    if keep_last < 1:
        raise store.StoreError(f"keep_last must be at least 1, not {keep_last}")
    guarded = {store.resolve_version(store_root, model, ref) for ref in protected}
    found = []
    for version_id in store.list_versions(store_root, model):
        manifest_path = store.version_dir(store_root, model, version_id) / store.MANIFEST_NAME
        try:
            published = manifest_path.stat().st_mtime
        except FileNotFoundError:
            published = 0.0  # no manifest: broken, and the oldest of all
        found.append((published, version_id))
    newest = {version_id for _, version_id in sorted(found, reverse=True)[:keep_last]}
    fates = []
    for published, version_id in sorted(found, reverse=True):
        if version_id in guarded:
            keep, reason = True, "protected"
        elif version_id in newest:
            keep, reason = True, f"one of the {keep_last} newest"
        else:
            keep, reason = False, f"older than the {keep_last} newest"
        size = _tree_size(store.version_dir(store_root, model, version_id))
        fates.append(VersionFate(version_id, published, size, keep, reason))
    return Plan(model, tuple(fates), tuple(_leftovers(store_root, model, incoming_age)))


def apply(store_root: Path, chosen: Plan) -> list[str]:
    """Carry ``chosen`` out (made just before, by the same command); return the deleted ids."""
    base = store.model_dir(store_root, chosen.model)
    deleted = []
    for fate in chosen.versions:
        if fate.keep:
            continue
        source = store.version_dir(store_root, chosen.model, fate.version_id)
        target = base / f"{DELETING_PREFIX}{fate.version_id[:12]}-{secrets.token_hex(4)}"
        try:
            source.rename(target)
        except FileNotFoundError:
            continue  # deleted meanwhile by another gc
        store.remove_tree(target)
        deleted.append(fate.version_id)
    for left in chosen.leftovers:
        store.remove_tree(left.path)
    return deleted


def render(chosen: Plan, *, deleted: bool) -> str:
    """One line per version and leftover, then what it frees."""
    lines = []
    for fate in chosen.versions:
        when = datetime.fromtimestamp(fate.published, UTC).strftime("%Y-%m-%dT%H:%MZ")
        action = "keep" if fate.keep else ("deleted" if deleted else "delete")
        lines.append(f"{action:8} {fate.version_id}  {when}  {_human(fate.size):>9}  {fate.reason}")
    for left in chosen.leftovers:
        action = "removed" if deleted else "remove"
        lines.append(
            f"{action:8} {left.path.name}  {_human(left.size):>9}  "
            f"left by a publish or gc that died ({left.age / 3600:.1f} h old)"
        )
    verb = "freed" if deleted else "would free"
    tail = "" if deleted else " (dry run: --delete deletes)"
    lines.append(f"{chosen.model}: {verb} {_human(chosen.freed)}{tail}")
    return "\n".join(lines)


def _leftovers(store_root: Path, model: str, incoming_age: float) -> list[Leftover]:
    base = store.model_dir(store_root, model)
    found = store.stale_incoming(base, incoming_age)
    with contextlib.suppress(FileNotFoundError):
        found += [c for c in base.iterdir() if c.name.startswith(DELETING_PREFIX)]
    now = time.time()
    leftovers = []
    for path in sorted(found):
        with contextlib.suppress(FileNotFoundError):
            leftovers.append(Leftover(path, _tree_size(path), now - path.stat().st_mtime))
    return leftovers


def _tree_size(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def _human(size: int) -> str:
    """Decimal units, as disks are sold."""
    if size < 1000:
        return f"{size} B"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"  # unreachable: size >= 1000
