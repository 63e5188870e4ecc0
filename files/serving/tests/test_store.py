from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import blake3
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
        assert any(p.startswith("config.json: blake3 ") for p in problems)
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
        # Still the same JSON, but no longer the canonical bytes the version id hashes.
        manifest.write_bytes(manifest.read_bytes().replace(b'"files":', b'"files": ', 1))
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


# --- manifest format 2: per-block digests ----------------------------------------------------

BLOCK = 1024 * 1024  # the src fixture's weights are 3 MiB + 17 bytes: 4 blocks, the last short


def _manifest_doc(root: Path, version_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        (store.version_dir(root, MODEL, version_id) / "manifest.json").read_bytes()
    )
    return doc


def _flip(path: Path, offset: int) -> None:
    path.chmod(0o644)
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


# Reference implementations of each format's block digests (not the store's own helpers).
BLOCK_DIGESTS = {
    2: ("sha256", lambda data: hashlib.sha256(data).hexdigest()),
    3: ("blake3", lambda data: blake3.blake3(data).hexdigest()),
}


def test_block_hashers_give_the_standard_digests() -> None:
    # Known answers from the SHA-256 and BLAKE3 specifications (empty input), so the manifests
    # stay checkable by any implementation, not only by the library the store calls.
    assert store.BLOCK_HASHERS["sha256"](b"") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert store.BLOCK_HASHERS["blake3"](b"") == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )
    assert set(store.BLOCK_HASHERS) == set(store.BLOCK_ALGORITHMS.values())


@pytest.mark.parametrize("fmt", [2, 3])
def test_publish_records_block_digests(src: Path, root: Path, fmt: int) -> None:
    (src / "empty.bin").write_bytes(b"")
    version_id = store.publish(src, root, MODEL, block_size=BLOCK, manifest_format=fmt)
    algorithm, digest = BLOCK_DIGESTS[fmt]

    doc = _manifest_doc(root, version_id)
    assert doc["format"] == fmt
    listed = {f["path"]: f for f in doc["files"]}
    weights = (src / "model.safetensors").read_bytes()
    entry = listed["model.safetensors"]
    # The whole-file sha256 stays (DESIGN.md's contract), for tooling that knows only format 1.
    assert entry["sha256"] == hashlib.sha256(weights).hexdigest()
    assert set(entry["blocks"]) == {"size", algorithm}
    assert entry["blocks"]["size"] == BLOCK
    assert entry["blocks"][algorithm] == [
        digest(weights[i : i + BLOCK]) for i in range(0, len(weights), BLOCK)
    ]
    assert len(entry["blocks"][algorithm]) == 4
    assert listed["config.json"]["blocks"][algorithm] == [digest(b'{"a": 1}')]
    assert listed["empty.bin"]["blocks"] == {algorithm: [], "size": BLOCK}
    assert store.verify_version(root, MODEL, version_id) == []
    manifest = store.read_manifest(root, MODEL, version_id)
    # Re-reading and re-serializing gives the same bytes, so the same id.
    assert manifest.version_id == version_id
    # The default block size is part of the content: another size is another version.
    assert store.publish(src, root, MODEL, manifest_format=fmt) != version_id


def test_publish_defaults_to_blake3_blocks(src: Path, root: Path) -> None:
    doc = _manifest_doc(root, store.publish(src, root, MODEL))
    assert doc["format"] == store.MANIFEST_FORMAT == 3
    assert all(set(f["blocks"]) == {"size", "blake3"} for f in doc["files"])
    assert {f["blocks"]["size"] for f in doc["files"]} == {store.BLOCK_SIZE}


def test_verification_hashes_blocks_in_parallel(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version_id = store.publish(src, root, MODEL, block_size=BLOCK)
    # Two block hashes must be in progress at once, or the barrier breaks (after 10 s).
    barrier = threading.Barrier(2, timeout=10)
    threads: set[str] = set()
    hash_span = store.hash_span

    def in_parallel(path: Path, begin: int, end: int, algorithm: str) -> tuple[int, str]:
        threads.add(threading.current_thread().name)
        if path.name == "model.safetensors" and begin < 2 * BLOCK:
            barrier.wait()  # blocks 0 and 1 of the same file meet here
        return hash_span(path, begin, end, algorithm)

    monkeypatch.setattr(store, "hash_span", in_parallel)
    assert store.verify_version(root, MODEL, version_id, threads=4) == []
    assert len(threads) >= 2


@pytest.mark.parametrize("fmt", [2, 3])
def test_verify_names_the_tampered_block(src: Path, root: Path, fmt: int) -> None:
    version_id = store.publish(src, root, MODEL, block_size=BLOCK, manifest_format=fmt)
    algorithm, digest = BLOCK_DIGESTS[fmt]
    weights = store.version_dir(root, MODEL, version_id) / "model.safetensors"
    expected = _manifest_doc(root, version_id)["files"][1]["blocks"][algorithm]
    _flip(weights, 2 * BLOCK + 5)

    (problem,) = store.verify_version(root, MODEL, version_id, threads=3)
    actual = digest(weights.read_bytes()[2 * BLOCK : 3 * BLOCK])
    assert problem == (
        f"model.safetensors: {algorithm} {actual[:16]}… != manifest {expected[2][:16]}… "
        f"in block 2 (bytes {2 * BLOCK}..{3 * BLOCK - 1})"
    )
    # The rollout test (molecule/cluster) greps `FAIL <file>: blake3 <16 hex>` from verify.
    assert re.search(rf"model[.]safetensors: {algorithm} [0-9a-f]+… != manifest", problem)

    _flip(weights, 3 * BLOCK + 1)  # the last, short block too
    (problem,) = store.verify_version(root, MODEL, version_id)
    assert "in block 2 " in problem
    assert problem.endswith("; 1 more of its 4 blocks differ")


def test_verify_reports_size_before_blocks(src: Path, root: Path) -> None:
    version_id = store.publish(src, root, MODEL, block_size=BLOCK)
    weights = store.version_dir(root, MODEL, version_id) / "model.safetensors"
    weights.chmod(0o644)
    with weights.open("ab") as fh:
        fh.write(b"\0")
    assert store.verify_version(root, MODEL, version_id) == [
        f"model.safetensors: size {3 * BLOCK + 18} != manifest {3 * BLOCK + 17}"
    ]


# A format 1 manifest as publish wrote it before block digests existed: it must keep its id.
FORMAT_1 = (
    b'{"files":[{"path":"a.bin","sha256":'
    b'"ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb","size":1}],"format":1}'
)


def test_format_1_manifests_keep_their_id_and_still_verify(src: Path, root: Path) -> None:
    manifest = store.Manifest.parse(FORMAT_1)
    assert manifest.format == 1
    assert manifest.files[0].blocks is None
    assert manifest.canonical_bytes() == FORMAT_1
    assert manifest.version_id == hashlib.sha256(FORMAT_1).hexdigest()

    version_id = store.publish(src, root, MODEL, manifest_format=1)
    doc = _manifest_doc(root, version_id)
    assert doc["format"] == 1
    assert all(set(f) == {"path", "sha256", "size"} for f in doc["files"])
    old_style = {
        "files": [
            {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for rel in ("config.json", "model.safetensors", "sub/tokenizer.json")
            for data in [(src / rel).read_bytes()]
        ],
        "format": 1,
    }
    canonical = json.dumps(old_style, sort_keys=True, separators=(",", ":")).encode()
    assert version_id == hashlib.sha256(canonical).hexdigest()
    assert store.read_manifest(root, MODEL, version_id).version_id == version_id
    assert store.verify_version(root, MODEL, version_id) == []
    _flip(store.version_dir(root, MODEL, version_id) / "model.safetensors", 10)
    (problem,) = store.verify_version(root, MODEL, version_id)
    assert re.fullmatch(
        r"model\.safetensors: sha256 [0-9a-f]{16}… != manifest [0-9a-f]{16}…", problem
    )


def _doc_with(**changes: Any) -> dict[str, Any]:
    """A one-file format 3 manifest, changed: ``blocks_<key>=`` changes a key of 'blocks'."""
    entry: dict[str, Any] = {
        "path": "w.bin",
        "sha256": "a" * 64,
        "size": 10,
        "blocks": {"size": 4096, "blake3": ["b" * 64]},
    }
    fmt = changes.pop("format", 3)
    for key, value in changes.items():
        if key.startswith("blocks_"):
            entry["blocks"][key.removeprefix("blocks_")] = value
        elif value is None:
            entry.pop(key)
        else:
            entry[key] = value
    return {"format": fmt, "files": [entry]}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_doc_with(size=5000), r"w\.bin: 1 block digests, but 5000 bytes in blocks of 4096 make 2"),
        (_doc_with(blocks_blake3=["b" * 64, "c" * 64]), r"w\.bin: 2 block digests, .* make 1"),
        (_doc_with(size=0), r"w\.bin: 1 block digests, but 0 bytes .* make 0"),
        (
            _doc_with(blocks_blake3=["B" * 64]),
            r"w\.bin: block 0 digest 'BBB.*' is not 64 lowercase",
        ),
        (_doc_with(blocks_blake3=["b" * 63]), r"w\.bin: block 0 digest .* is not 64 lowercase"),
        (_doc_with(blocks_blake3=[7]), r"w\.bin: block 0 digest 7 is not 64 lowercase"),
        (_doc_with(blocks_blake3="b" * 64), r"w\.bin: 'blocks' must be"),
        (_doc_with(blocks_size="4096"), r"w\.bin: 'blocks' must be"),
        (_doc_with(blocks_size=True), r"w\.bin: 'blocks' must be"),
        (_doc_with(blocks_size=512), r"w\.bin: block size 512 is not an integer in 4096\.\."),
        (_doc_with(blocks_size=2**31), r"w\.bin: block size 2147483648 is not an integer in"),
        (_doc_with(blocks=None), r"w\.bin: no 'blocks' \(format 3 lists block digests"),
        (_doc_with(format=1), r"w\.bin: 'blocks' must be absent \(format 1 has no block"),
        # A format 2 manifest lists sha256 blocks: blake3 ones under format 2 are not read as such.
        (_doc_with(format=2), r"w\.bin: 'blocks' must be \{\"size\": <int>, \"sha256\": "),
        (
            _doc_with(format=4),
            r"unsupported manifest format 4 \(this metalserve reads formats 1, 2, 3\)",
        ),
        (_doc_with(sha256="xyz"), r"w\.bin: sha256 'xyz' is not 64 lowercase hex digits"),
        (_doc_with(size=-1), r"w\.bin: size -1 is not a non-negative integer"),
        (_doc_with(size="10"), r"w\.bin: size '10' is not a non-negative integer"),
        (_doc_with(size=None), r"w\.bin: no 'size'"),
        ({"format": 3, "files": {"w.bin": {}}}, r"'files' is not a list"),
        ({"format": 3, "files": [_doc_with()["files"][0]] * 2}, r"'w\.bin' is listed twice"),
        ([], r"not a JSON object"),
    ],
)
def test_malformed_manifests_name_the_problem(doc: Any, message: str) -> None:
    with pytest.raises(store.StoreError, match=message):
        store.Manifest.parse(json.dumps(doc).encode())


def test_manifests_built_in_code_get_the_same_checks() -> None:
    entry = store.FileEntry("w.bin", 10, "a" * 64, store.Blocks(4096, ("b" * 64,), "sha256"))
    with pytest.raises(store.StoreError, match=r"'sha256' block digests in a format 3 manifest"):
        store.Manifest(files=(entry,), format=3)
    assert store.Manifest(files=(entry,), format=2).files == (entry,)
    with pytest.raises(store.StoreError, match=r"format 1 manifests have no 'blocks'"):
        store.Manifest(files=(entry,), format=1)


def test_a_valid_block_list_parses() -> None:
    manifest = store.Manifest.parse(json.dumps(_doc_with()).encode())
    (entry,) = manifest.files
    assert entry.blocks == store.Blocks(4096, ("b" * 64,), "blake3")
    assert entry.blocks.span(0, entry.size) == (0, 10)
