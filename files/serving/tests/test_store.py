from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metalserve import store

MODEL = "m"


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "model.safetensors").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "sub" / "tokenizer.json").write_text("{}")
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


def test_publish_layout_and_manifest(src: Path, root: Path) -> None:
    version_id = store.publish(src, root, MODEL)

    vdir = root / MODEL / "versions" / version_id
    manifest_bytes = (vdir / "manifest.json").read_bytes()
    assert hashlib.sha256(manifest_bytes).hexdigest() == version_id
    manifest = json.loads(manifest_bytes)
    # Canonical form: sorted keys, no spaces.
    assert manifest_bytes == json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == {"config.json", "model.safetensors", "sub/tokenizer.json"}
    weights = (src / "model.safetensors").read_bytes()
    assert listed["model.safetensors"]["size"] == len(weights)
    assert listed["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert (vdir / "sub" / "tokenizer.json").read_text() == "{}"
    assert store.verify_version(root, MODEL, version_id) == []
    assert store.list_versions(root, MODEL) == [version_id]
    assert not list((root / MODEL).glob(".incoming-*"))


def test_version_id_depends_only_on_content(src: Path, tmp_path: Path) -> None:
    first = store.publish(src, tmp_path / "a", MODEL)
    later = time.time() + 3600
    for path in src.rglob("*"):
        os.utime(path, (later, later))
    assert store.publish(src, tmp_path / "b", "another-name") == first

    (src / "config.json").write_text('{"a": 2}')
    assert store.publish(src, tmp_path / "a", MODEL) != first


def test_republish_is_idempotent_and_touches_nothing(src: Path, root: Path) -> None:
    version_id = store.publish(src, root, MODEL)
    vdir = store.version_dir(root, MODEL, version_id)
    before = {p: p.stat().st_mtime_ns for p in vdir.rglob("*")}

    assert store.publish(src, root, MODEL) == version_id

    assert {p: p.stat().st_mtime_ns for p in vdir.rglob("*")} == before
    assert store.list_versions(root, MODEL) == [version_id]
    assert not list((root / MODEL).glob(".incoming-*"))


def test_versions_are_immutable(src: Path, root: Path) -> None:
    version_id = store.publish(src, root, MODEL)
    vdir = store.version_dir(root, MODEL, version_id)
    weights = vdir / "model.safetensors"
    assert not weights.stat().st_mode & 0o222, "published files must be read-only"

    # Someone forces a change; publishing the original content again must not repair (i.e.
    # overwrite) the existing version: it stays as it is and verification reports it.
    weights.chmod(0o644)
    weights.write_bytes(b"tampered")
    assert store.publish(src, root, MODEL) == version_id
    assert weights.read_bytes() == b"tampered"
    assert any("model.safetensors" in p for p in store.verify_version(root, MODEL, version_id))


def test_failed_publish_leaves_no_version(src: Path, root: Path) -> None:
    copied: list[str] = []

    def fail_after_first(rel: str) -> None:
        copied.append(rel)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.publish(src, root, MODEL, on_file_copied=fail_after_first)

    assert copied, "the failure must happen mid-publish"
    assert store.list_versions(root, MODEL) == []
    assert not list((root / MODEL).glob(".incoming-*"))


def test_killed_publish_leaves_no_version_and_is_cleaned_later(src: Path, root: Path) -> None:
    # A real SIGKILL after the first file is copied: no cleanup code gets to run.
    script = (
        "import os, signal, sys; from pathlib import Path; from metalserve import store; "
        "store.publish(Path(sys.argv[1]), Path(sys.argv[2]), 'm', "
        "on_file_copied=lambda rel: os.kill(os.getpid(), signal.SIGKILL))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(src), str(root)], timeout=60, check=False
    )
    assert proc.returncode == -signal.SIGKILL

    leftovers = list((root / MODEL).glob(".incoming-*"))
    assert len(leftovers) == 1, "the killed publish leaves its private incoming dir"
    assert store.list_versions(root, MODEL) == [], "readers see no version"

    # A recent leftover may belong to a publish still running: the next publish keeps it...
    version_id = store.publish(src, root, MODEL)
    assert leftovers[0].exists()
    assert store.list_versions(root, MODEL) == [version_id]
    # ...but removes it once it is old.
    old = time.time() - store.STALE_INCOMING_SECONDS - 60
    os.utime(leftovers[0], (old, old))
    store.publish(src, root, MODEL)
    assert not leftovers[0].exists()


def test_publish_skips_a_source_manifest(src: Path, root: Path) -> None:
    (src / "manifest.json").write_text("not ours")
    version_id = store.publish(src, root, MODEL)
    assert store.verify_version(root, MODEL, version_id) == []
    assert "manifest.json" not in {
        e.path for e in store.read_manifest(root, MODEL, version_id).files
    }


def test_publish_rejects_empty_source_and_bad_model_name(tmp_path: Path, src: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(store.StoreError, match="no files"):
        store.publish(tmp_path / "empty", tmp_path / "store", MODEL)
    with pytest.raises(store.StoreError, match="invalid model name"):
        store.publish(src, tmp_path / "store", "../escape")


class TestVerify:
    def test_reports_every_problem_by_file(self, src: Path, root: Path) -> None:
        version_id = store.publish(src, root, MODEL)
        vdir = store.version_dir(root, MODEL, version_id)
        (vdir / "config.json").chmod(0o644)
        (vdir / "config.json").write_text('{"a": 9}')  # same size, other content
        (vdir / "sub" / "tokenizer.json").unlink()
        (vdir / "stray.bin").write_bytes(b"x")

        problems = store.verify_version(root, MODEL, version_id)

        assert len(problems) == 3
        assert any(p.startswith("config.json: sha256") for p in problems)
        assert "sub/tokenizer.json: missing" in problems
        assert any(p.startswith("stray.bin: extra") for p in problems)

    def test_size_mismatch(self, src: Path, root: Path) -> None:
        version_id = store.publish(src, root, MODEL)
        weights = store.version_dir(root, MODEL, version_id) / "model.safetensors"
        weights.chmod(0o644)
        with weights.open("ab") as fh:
            fh.write(b"\0")
        assert [p.split(":")[0] for p in store.verify_version(root, MODEL, version_id)] == [
            "model.safetensors"
        ]

    def test_tampered_manifest(self, src: Path, root: Path) -> None:
        version_id = store.publish(src, root, MODEL)
        manifest = store.version_dir(root, MODEL, version_id) / "manifest.json"
        manifest.chmod(0o644)
        manifest.write_bytes(manifest.read_bytes().replace(b'"format":2', b'"format":2 '))
        problems = store.verify_version(root, MODEL, version_id)
        assert problems
        assert problems[0].startswith("manifest.json")


class TestResolve:
    def test_full_id_and_prefix(self, src: Path, root: Path) -> None:
        version_id = store.publish(src, root, MODEL)
        assert store.resolve_version(root, MODEL, version_id) == version_id
        assert store.resolve_version(root, MODEL, version_id[:12]) == version_id
        assert store.resolve_version(root, MODEL, version_id[:20].upper()) == version_id

    def test_errors(self, src: Path, root: Path) -> None:
        version_id = store.publish(src, root, MODEL)
        with pytest.raises(store.VersionNotFoundError, match="too short"):
            store.resolve_version(root, MODEL, version_id[:11])
        with pytest.raises(store.VersionNotFoundError, match="no version"):
            store.resolve_version(root, MODEL, "0" * 12 if version_id[0] != "0" else "f" * 12)
        with pytest.raises(store.VersionNotFoundError, match="not a version id"):
            store.resolve_version(root, MODEL, "latest")
        with pytest.raises(store.VersionNotFoundError):
            store.resolve_version(root, "unknown-model", version_id)

    def test_ambiguous_prefix(self, root: Path) -> None:
        versions = root / MODEL / "versions"
        for suffix in ("a" * 52, "b" * 52):
            (versions / ("0123456789ab" + suffix)).mkdir(parents=True)
        with pytest.raises(store.AmbiguousVersionError, match="ambiguous"):
            store.resolve_version(root, MODEL, "0123456789ab")
        assert store.resolve_version(root, MODEL, "0123456789aba").endswith("a" * 52)

    def test_incoming_dirs_are_not_versions(self, root: Path) -> None:
        (root / MODEL / "versions").mkdir(parents=True)
        (root / MODEL / (store.INCOMING_PREFIX + "abc")).mkdir()
        (root / MODEL / "versions" / "not-a-version").mkdir()
        assert store.list_versions(root, MODEL) == []


def test_manifest_rejects_escaping_paths() -> None:
    doc = {"format": 1, "files": [{"path": "../etc/passwd", "size": 1, "sha256": "0" * 64}]}
    with pytest.raises(store.StoreError, match="relative"):
        store.Manifest.parse(json.dumps(doc).encode())
