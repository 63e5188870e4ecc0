"""Store retention: ``metalserve.retention`` and ``metalserve gc`` on a real store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import run_cli
from metalserve import retention, store

MODEL = "m"
HOUR = 3600.0


def _publish(root: Path, tmp_path: Path, number: int, age_hours: float) -> str:
    """A version with its own content, published ``age_hours`` ago (its manifest's mtime)."""
    src = tmp_path / f"src{number}"
    src.mkdir()
    (src / "weights.bin").write_bytes(bytes([number]) * (1000 + number))
    version_id = store.publish(src, root, MODEL)
    manifest = store.version_dir(root, MODEL, version_id) / store.MANIFEST_NAME
    stamp = time.time() - age_hours * HOUR
    os.utime(manifest, (stamp, stamp))
    return version_id


@pytest.fixture
def versions(tmp_path: Path) -> tuple[Path, list[str]]:
    """Five versions, newest first."""
    root = tmp_path / "store"
    ids = [_publish(root, tmp_path, number, age_hours=number) for number in range(5)]
    return root, ids


def test_keeps_the_newest_and_the_protected(versions: tuple[Path, list[str]]) -> None:
    root, ids = versions
    chosen = retention.plan(root, MODEL, keep_last=2, protected=[ids[4][:12]])
    fates = {f.version_id: f for f in chosen.versions}
    assert [f.version_id for f in chosen.versions] == ids  # newest first
    assert {v for v, f in fates.items() if f.keep} == {ids[0], ids[1], ids[4]}
    assert fates[ids[4]].reason == "protected"
    assert fates[ids[2]].reason == "older than the 2 newest"
    assert chosen.freed == fates[ids[2]].size + fates[ids[3]].size > 2000


def test_a_dry_run_deletes_nothing_and_delete_deletes_exactly_the_plan(
    versions: tuple[Path, list[str]],
) -> None:
    root, ids = versions
    dry = run_cli("gc", "--store", str(root), "--model", MODEL, "--keep-last", "2")
    assert dry.returncode == 0, dry.stderr
    assert store.list_versions(root, MODEL) == sorted(ids)
    assert f"delete   {ids[2]}" in dry.stdout
    assert "would free" in dry.stdout
    assert "dry run" in dry.stdout

    done = run_cli(
        "gc", "--store", str(root), "--model", MODEL, "--keep-last", "2",
        "--protect", ids[3], "--delete",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert store.list_versions(root, MODEL) == sorted([ids[0], ids[1], ids[3]])
    assert f"deleted  {ids[2]}" in done.stdout
    assert f"deleted  {ids[4]}" in done.stdout
    # Nothing left behind: the deleted versions were renamed out of versions/, then removed.
    assert sorted(p.name for p in store.model_dir(root, MODEL).iterdir()) == ["versions"]
    for kept in (ids[0], ids[1], ids[3]):
        assert store.verify_version(root, MODEL, kept) == []


def test_an_unknown_protected_version_stops_gc(versions: tuple[Path, list[str]]) -> None:
    root, ids = versions
    result = run_cli(
        "gc", "--store", str(root), "--model", MODEL, "--keep-last", "1",
        "--protect", "0" * 12, "--delete",
    )  # fmt: skip
    assert result.returncode == 4
    assert "0" * 12 in result.stderr
    assert store.list_versions(root, MODEL) == sorted(ids)


def test_bad_keep_last_is_a_usage_error(versions: tuple[Path, list[str]]) -> None:
    root, _ = versions
    result = run_cli("gc", "--store", str(root), "--model", MODEL, "--keep-last", "0")
    assert result.returncode == 2
    assert "--keep-last" in result.stderr


def test_leftovers_of_dead_publishes_and_gcs_go_fresh_staging_stays(tmp_path: Path) -> None:
    root = tmp_path / "store"
    kept = _publish(root, tmp_path, 1, age_hours=0)
    base = store.model_dir(root, MODEL)
    dead = base / f"{store.INCOMING_PREFIX}dead"
    live = base / f"{store.INCOMING_PREFIX}live"
    interrupted = base / f"{retention.DELETING_PREFIX}0123456789ab-00ff"
    for directory in (dead, live, interrupted):
        directory.mkdir()
        (directory / "part").write_bytes(b"x" * 500)
    old = time.time() - store.STALE_INCOMING_SECONDS - 60
    os.utime(dead, (old, old))

    chosen = retention.plan(root, MODEL, keep_last=1)
    assert {left.path.name for left in chosen.leftovers} == {dead.name, interrupted.name}
    assert chosen.freed == 1000
    retention.apply(root, chosen)
    assert sorted(p.name for p in base.iterdir()) == sorted([live.name, "versions"])
    assert store.list_versions(root, MODEL) == [kept]
