"""The node-local cache of verified versions: adding, leases, eviction, damage and races."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from conftest import MODEL, Store, corrupt_weights, run_cli
from metalserve import store
from metalserve.cache import VersionCache
from metalserve.replica import Replica
from metalserve.settings import ServeSettings


def _size(model_store: Store, version_id: str) -> int:
    manifest = store.read_manifest(model_store.root, MODEL, version_id)
    return sum(entry.size for entry in manifest.files)


def test_an_added_version_is_complete_verified_and_leased(
    model_store: Store, tmp_path: Path
) -> None:
    cache = VersionCache(tmp_path, 2**30)
    assert cache.acquire(MODEL, model_store.v1) is None
    assert cache.add(model_store.root, MODEL, model_store.v1)
    assert cache.add(model_store.root, MODEL, model_store.v1)  # already there: unchanged
    lease = cache.acquire(MODEL, model_store.v1)
    assert lease is not None
    assert lease.root == tmp_path
    manifest = store.read_manifest(tmp_path, MODEL, model_store.v1)
    assert (
        store.verify_files(store.version_dir(tmp_path, MODEL, model_store.v1), manifest.files) == []
    )
    assert not list(store.model_dir(tmp_path, MODEL).glob(".incoming-*"))
    lease.release()


def test_a_tampered_store_copy_is_never_cached(model_store: Store, tmp_path: Path) -> None:
    cache = VersionCache(tmp_path, 2**30)
    with pytest.raises(store.VerificationError):
        cache.add(model_store.root, MODEL, model_store.corrupt)
    assert store.list_versions(tmp_path, MODEL) == []
    assert not list(store.model_dir(tmp_path, MODEL).glob(".incoming-*"))


def test_eviction_spares_leased_and_protected_versions(model_store: Store, tmp_path: Path) -> None:
    room_for_one = max(_size(model_store, model_store.v1), _size(model_store, model_store.v2)) + 1
    cache = VersionCache(tmp_path, room_for_one)
    assert cache.add(model_store.root, MODEL, model_store.v1)
    lease = cache.acquire(MODEL, model_store.v1)
    assert lease is not None
    # v1 is in use: v2 does not fit beside it, and v1 stays.
    assert not cache.add(model_store.root, MODEL, model_store.v2)
    assert store.list_versions(tmp_path, MODEL) == [model_store.v1]
    lease.release()
    # Protected (the host's record names it): still kept.
    (tmp_path / "protected").write_text(f"{model_store.v1}\n")
    assert not cache.add(model_store.root, MODEL, model_store.v2)
    (tmp_path / "protected").unlink()
    # Neither: the least recently used goes.
    assert cache.add(model_store.root, MODEL, model_store.v2)
    assert store.list_versions(tmp_path, MODEL) == [model_store.v2]


def test_a_version_larger_than_the_cache_is_not_cached(model_store: Store, tmp_path: Path) -> None:
    cache = VersionCache(tmp_path, 1024)
    assert not cache.add(model_store.root, MODEL, model_store.v1)
    assert store.list_versions(tmp_path, MODEL) == []


def test_two_replicas_caching_one_version_at_once(model_store: Store, tmp_path: Path) -> None:
    cache = VersionCache(tmp_path, 2**30)
    results: list[bool] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(cache.add(model_store.root, MODEL, model_store.v1))
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 4
    assert store.list_versions(tmp_path, MODEL) == [model_store.v1]
    assert not list(store.model_dir(tmp_path, MODEL).glob(".incoming-*"))


def test_a_crash_mid_write_leaves_nothing_visible(model_store: Store, tmp_path: Path) -> None:
    base = store.model_dir(tmp_path, MODEL)
    dead = base / ".incoming-deadbeef"
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"half a file")
    (dead / store.MANIFEST_NAME).write_bytes(
        (
            store.version_dir(model_store.root, MODEL, model_store.v1) / store.MANIFEST_NAME
        ).read_bytes()
    )
    dying = base / ".deleting-0123"
    dying.mkdir()
    cache = VersionCache(tmp_path, 2**30)
    assert cache.acquire(MODEL, model_store.v1) is None
    assert store.list_versions(tmp_path, MODEL) == []
    hour_ago = time.time() - 2 * store.STALE_INCOMING_SECONDS
    os.utime(dead, (hour_ago, hour_ago))
    assert cache.add(model_store.root, MODEL, model_store.v1)
    assert not dead.exists()
    assert not dying.exists()


def _replica(model_store: Store, cache_dir: Path, version: str) -> Replica:
    settings = ServeSettings(
        store=model_store.root, model=MODEL, version=version, cache_dir=cache_dir
    )
    return Replica(settings, version)


def _wait_cached(cache_dir: Path, version: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while store.version_dir(cache_dir, MODEL, version).is_dir() is False:
        assert time.monotonic() < deadline, "the version was not cached in time"
        time.sleep(0.05)


def _cache_loads(replica: Replica, result: str) -> float:
    value = replica.metrics.registry.get_sample_value(
        "metalserve_cache_loads_total", {"result": result}
    )
    return value or 0.0


def test_a_replica_loads_from_the_store_once_then_from_its_node(
    model_store: Store, tmp_path: Path
) -> None:
    first = _replica(model_store, tmp_path, model_store.v1)
    assert first.host._load(model_store.v1).version_id == model_store.v1
    assert _cache_loads(first, "miss") == 1
    _wait_cached(tmp_path, model_store.v1)
    second = _replica(model_store, tmp_path, model_store.v1)
    bundle = second.host._load(model_store.v1)
    assert bundle.version_id == model_store.v1
    assert _cache_loads(second, "hit") == 1
    # Its lease keeps the version while it serves it.
    assert not VersionCache(tmp_path, 1)._evict(MODEL, model_store.v1)


def test_a_corrupted_cached_copy_is_dropped_never_served(
    model_store: Store, tmp_path: Path
) -> None:
    cache = VersionCache(tmp_path, 2**30)
    assert cache.add(model_store.root, MODEL, model_store.v2)
    corrupt_weights(store.version_dir(tmp_path, MODEL, model_store.v2) / "model.safetensors")
    replica = _replica(model_store, tmp_path, model_store.v2)
    bundle = replica.host._load(model_store.v2)  # from the store, verified
    assert bundle.version_id == model_store.v2
    assert _cache_loads(replica, "corrupt") == 1
    _wait_cached(tmp_path, model_store.v2)  # and cached again, intact
    manifest = store.read_manifest(tmp_path, MODEL, model_store.v2)
    assert (
        store.verify_files(store.version_dir(tmp_path, MODEL, model_store.v2), manifest.files) == []
    )


def test_cache_fill_prefetches_protects_and_says_when_a_version_does_not_fit(
    model_store: Store, tmp_path: Path
) -> None:
    common = ["--store", str(model_store.root), "--model", MODEL, "--cache-dir", str(tmp_path)]
    first = run_cli(
        "cache-fill", *common, "--version", model_store.v1[:12], "--protect", model_store.v2
    )
    assert first.returncode == 0, first.stderr
    assert f"{model_store.v1}: cached in" in first.stdout
    assert store.list_versions(tmp_path, MODEL) == [model_store.v1]
    # The target is protected with the versions named.
    assert VersionCache(tmp_path, 1).protected() == {model_store.v1, model_store.v2}
    again = run_cli("cache-fill", *common, "--version", model_store.v1)
    assert again.returncode == 0
    assert "already cached" in again.stdout
    # A cache too small for v2: exit 6, v1 untouched.
    full = run_cli("cache-fill", *common, "--version", model_store.v2, "--max-gib", "0.000001")
    assert full.returncode == 6
    assert "does not fit the cache" in full.stderr
    assert store.list_versions(tmp_path, MODEL) == [model_store.v1]
