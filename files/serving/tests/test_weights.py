"""The streaming weight path (``metalserve.weights``) against safetensors' ``load_file``, on
``bench load``'s generated checkpoint: equal tensors, dtype conversion, block digests of manifest
formats 3 and 2, format 1 versions, and tampering refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from metalserve import store, weights
from metalserve.bench import load as bench_load
from metalserve.bench.options import BenchLoadSettings

CPU = torch.device("cpu")
# Not a multiple of any tensor size: tensors straddle chunk boundaries.
ODD_CHUNK = 1_000_003


# --- the streaming weight path ----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bench_load.Checkpoint:
    options = BenchLoadSettings(
        dir=tmp_path_factory.mktemp("checkpoint"), size_gib=0.01, shards=2, device="cpu"
    )
    first = bench_load.prepare_checkpoint(options)
    again = bench_load.prepare_checkpoint(options)
    assert again.reused
    assert not first.reused
    assert again.version_id == first.version_id
    return again


def _reference(checkpoint: bench_load.Checkpoint) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint.paths:
        tensors.update(load_file(path))
    return tensors


def _load(
    root: Path,
    checkpoint: bench_load.Checkpoint,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}

    def destination(spec: weights.TensorSpec) -> torch.Tensor:
        tensors[spec.name] = torch.empty(spec.shape, dtype=dtype or spec.dtype)
        return tensors[spec.name]

    weights.load_weights(
        store.version_dir(root, bench_load.MODEL, checkpoint.version_id),
        checkpoint.entries,
        checkpoint.version_id,
        destination,
        device=CPU,
        chunk_size=ODD_CHUNK,
        **kwargs,
    )
    return tensors


@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_tensors_equal_load_file(checkpoint: bench_load.Checkpoint, workers: int) -> None:
    reference = _reference(checkpoint)
    loaded = _load(checkpoint.store_root, checkpoint, workers=workers)
    assert loaded.keys() == reference.keys()
    assert len(reference) > 4
    for name, tensor in reference.items():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], tensor), name


def test_streamed_tensors_convert_dtype(checkpoint: bench_load.Checkpoint) -> None:
    reference = _reference(checkpoint)
    loaded = _load(checkpoint.store_root, checkpoint, dtype=torch.float32, verify=False)
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor.float()), name


def _tampered_copy(tmp_path: Path, checkpoint: bench_load.Checkpoint, at: int) -> Path:
    import shutil

    root = tmp_path / "store"
    shutil.copytree(checkpoint.store_root, root)
    shard = store.version_dir(root, bench_load.MODEL, checkpoint.version_id) / (
        checkpoint.entries[-1].path
    )
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    data[at if at >= 0 else len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return root


# -1: the middle of the file (tensor bytes); 8: the header's opening brace (no longer JSON).
@pytest.mark.parametrize("at", [-1, 8], ids=["tensor-bytes", "header"])
def test_tampered_shard_is_refused(
    tmp_path: Path, checkpoint: bench_load.Checkpoint, at: int
) -> None:
    root = _tampered_copy(tmp_path, checkpoint, at)
    name = checkpoint.entries[-1].path.replace(".", r"\.")
    expected = rf"{name}: blake3 [0-9a-f]{{16}}… != manifest"
    with pytest.raises(store.VerificationError, match=expected):
        _load(root, checkpoint)


def test_unknown_and_misshapen_tensors_are_refused(checkpoint: bench_load.Checkpoint) -> None:
    vdir = store.version_dir(checkpoint.store_root, bench_load.MODEL, checkpoint.version_id)

    def unknown(spec: weights.TensorSpec) -> torch.Tensor | None:
        return None

    def misshapen(spec: weights.TensorSpec) -> torch.Tensor:
        return torch.empty(1, dtype=spec.dtype)

    for destination, match in ((unknown, "unexpected tensors"), (misshapen, "expects")):
        with pytest.raises(weights.WeightsError, match=match):
            weights.load_weights(
                vdir, checkpoint.entries, checkpoint.version_id, destination, device=CPU
            )


def test_parse_header_rejects_bad_headers() -> None:
    good = b'{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'
    head = len(good).to_bytes(8, "little") + good
    (spec,) = weights.parse_header(head, len(head) + 4)
    assert (spec.name, spec.dtype, spec.shape, spec.begin, spec.end) == (
        "a",
        torch.bfloat16,
        (2,),
        len(head),
        len(head) + 4,
    )
    with pytest.raises(weights.WeightsError, match="past the end"):
        weights.parse_header(head, len(head) + 2)
    bad_size = good.replace(b"[0,4]", b"[0,6]")
    with pytest.raises(weights.WeightsError, match="do not hold"):
        weights.parse_header(len(bad_size).to_bytes(8, "little") + bad_size, 1000)
    with pytest.raises(weights.WeightsError, match="does not fit"):
        weights.parse_header((2**40).to_bytes(8, "little") + good, 1000)


# --- block digests (manifest formats 3 and 2) and format 1 versions of the same shards --------

# Not a divisor of anything: reads of ODD_CHUNK round to 4 blocks, blocks straddle tensors.
ODD_BLOCK = 262_147


@pytest.fixture(scope="module")
def versions(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: bench_load.Checkpoint
) -> dict[str, tuple[Path, str]]:
    """The checkpoint's shards published again: in blocks of ODD_BLOCK (format 3: blake3, format
    2: sha256), and in format 1."""
    import shutil

    base = tmp_path_factory.mktemp("versions")
    src = base / "src"
    src.mkdir()
    for path in checkpoint.paths:
        shutil.copyfile(path, src / path.name)
    root = base / "store"
    blocks = store.publish(src, root, bench_load.MODEL, block_size=ODD_BLOCK)
    sha256_blocks = store.publish(
        src, root, bench_load.MODEL, block_size=ODD_BLOCK, manifest_format=2
    )
    format_1 = store.publish(src, root, bench_load.MODEL, manifest_format=1)
    return {
        "blocks": (root, blocks),
        "format2": (root, sha256_blocks),
        "format1": (root, format_1),
    }


# Each block-digest version, with its algorithm.
BLOCK_VERSIONS = pytest.mark.parametrize(
    ("kind", "algorithm"), [("blocks", "blake3"), ("format2", "sha256")]
)


def _load_version(
    root: Path, version_id: str, dtype: torch.dtype | None = None, **kwargs: Any
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}

    def destination(spec: weights.TensorSpec) -> torch.Tensor:
        tensors[spec.name] = torch.empty(spec.shape, dtype=dtype or spec.dtype)
        return tensors[spec.name]

    manifest = store.read_manifest(root, bench_load.MODEL, version_id)
    weights.load_weights(
        store.version_dir(root, bench_load.MODEL, version_id),
        manifest.files,
        version_id,
        destination,
        device=CPU,
        chunk_size=ODD_CHUNK,
        **kwargs,
    )
    return tensors


# A range of 5 blocks: reads are 4 (ODD_CHUNK), so each range ends on a short read, and several
# readers stream parts of one shard at once.
@BLOCK_VERSIONS
@pytest.mark.parametrize(
    ("workers", "hash_threads", "range_size"),
    [(1, 1, weights.RANGE_SIZE), (2, 3, weights.RANGE_SIZE), (3, 2, 5 * ODD_BLOCK)],
)
def test_block_verified_stream_equals_load_file(
    checkpoint: bench_load.Checkpoint,
    versions: dict[str, tuple[Path, str]],
    workers: int,
    hash_threads: int,
    range_size: int,
    kind: str,
    algorithm: str,
) -> None:
    root, version_id = versions[kind]
    entries = store.read_manifest(root, bench_load.MODEL, version_id).files
    assert all(
        e.blocks is not None and e.blocks.algorithm == algorithm and len(e.blocks.digests) > 8
        for e in entries
    )
    assert weights.read_size(entries[0].blocks, ODD_CHUNK) == 4 * ODD_BLOCK
    reference = _reference(checkpoint)
    loaded = _load_version(
        root, version_id, workers=workers, hash_threads=hash_threads, range_size=range_size
    )
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor), name
    # Converted tensors are finished by the one job that reads them: ranges are cut between.
    converted = _load_version(
        root, version_id, dtype=torch.float32, verify=False, range_size=range_size
    )
    for name, tensor in reference.items():
        assert torch.equal(converted[name], tensor.float()), name


@BLOCK_VERSIONS
@pytest.mark.parametrize("range_size", [weights.RANGE_SIZE, 3 * ODD_BLOCK])
def test_stream_results_carry_every_block_digest(
    versions: dict[str, tuple[Path, str]], kind: str, algorithm: str, range_size: int
) -> None:
    root, version_id = versions[kind]
    vdir = store.version_dir(root, bench_load.MODEL, version_id)
    entries = store.read_manifest(root, bench_load.MODEL, version_id).files
    jobs = [(vdir / e.path, []) for e in entries]  # no tensors wanted: hashing only
    results = weights.stream_shards(
        jobs,
        device=CPU,
        chunk_size=ODD_CHUNK,
        blocks=[e.blocks for e in entries],
        hash_threads=4,
        workers=3,
        range_size=range_size,
    )
    for entry, result in zip(entries, results, strict=True):
        assert entry.blocks is not None
        assert result.size == entry.size
        assert entry.blocks.algorithm == algorithm
        assert result.blocks == entry.blocks.digests
        assert result.sha256 is None


def test_format_1_version_still_loads(
    checkpoint: bench_load.Checkpoint, versions: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    import shutil

    root, version_id = versions["format1"]
    entries = store.read_manifest(root, bench_load.MODEL, version_id).files
    assert all(e.blocks is None for e in entries)
    reference = _reference(checkpoint)
    loaded = _load_version(root, version_id, workers=2)
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor), name

    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    shard = store.version_dir(copy, bench_load.MODEL, version_id) / entries[0].path
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    name = entries[0].path.replace(".", r"\.")
    with pytest.raises(store.VerificationError, match=rf"{name}: sha256 [0-9a-f]{{16}}…[^;]*$"):
        _load_version(copy, version_id)


# -1: the middle of the file (tensor bytes); 8: the header's opening brace (no longer JSON).
@BLOCK_VERSIONS
@pytest.mark.parametrize("at", [-1, 8], ids=["tensor-bytes", "header"])
def test_one_tampered_block_is_refused(
    tmp_path: Path, versions: dict[str, tuple[Path, str]], at: int, kind: str, algorithm: str
) -> None:
    import shutil

    root, version_id = versions[kind]
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    entry = store.read_manifest(copy, bench_load.MODEL, version_id).files[-1]
    shard = store.version_dir(copy, bench_load.MODEL, version_id) / entry.path
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    offset = at if at >= 0 else len(data) // 2
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    block = offset // ODD_BLOCK
    name = entry.path.replace(".", r"\.")
    filled: dict[str, torch.Tensor] = {}

    def destination(spec: weights.TensorSpec) -> torch.Tensor:
        filled[spec.name] = torch.empty(spec.shape, dtype=spec.dtype)
        return filled[spec.name]

    with pytest.raises(
        store.VerificationError,
        match=rf"{name}: {algorithm} [0-9a-f]{{16}}… != manifest [0-9a-f]{{16}}… in block {block} "
        rf"\(bytes {block * ODD_BLOCK}\.\.{(block + 1) * ODD_BLOCK - 1}\)$",
    ):
        weights.load_weights(
            store.version_dir(copy, bench_load.MODEL, version_id),
            store.read_manifest(copy, bench_load.MODEL, version_id).files,
            version_id,
            destination,
            device=CPU,
            hash_threads=3,
            workers=3,
            range_size=3 * ODD_BLOCK,  # the block is found whichever reader read it
        )


# --- where BLAKE3 blocks are hashed (verify_on) -------------------------------------------------


def test_verify_on_is_checked_and_device_hashing_needs_a_usable_device(
    versions: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from metalserve import gpu_blake3

    root, version_id = versions["blocks"]
    with pytest.raises(ValueError, match="verify_on 'gpu' is not one of auto, host, device"):
        _load_version(root, version_id, verify_on="gpu")
    monkeypatch.setattr(gpu_blake3, "missing", lambda device: "no kernels here")
    with pytest.raises(weights.WeightsError, match="cannot verify BLAKE3 blocks on cpu: no kern"):
        _load_version(root, version_id, verify_on="device")
    # auto and host: on a CPU device, on CPU threads (the kernels are not even asked).
    monkeypatch.setattr(gpu_blake3, "blake3_blocks", None)
    for verify_on in ("auto", "host"):
        assert _load_version(root, version_id, verify_on=verify_on)
    # SHA-256 blocks (format 2) are never hashed on the device.
    sha_root, sha_version = versions["format2"]
    assert _load_version(sha_root, sha_version, verify_on="device")


def test_readers_take_every_core_when_none_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "default_threads", lambda: 16)
    assert weights.default_workers(64) == 8  # 8 more threads hash
    assert weights.default_workers(64, host_hashing=False) == 12  # a quarter left to the GIL
    assert weights.default_workers(3, host_hashing=False) == 3
    monkeypatch.setattr(store, "default_threads", lambda: 64)
    assert weights.default_workers(64, host_hashing=False) == weights.MAX_READERS


def _target(name: str, begin: int, end: int, *, direct: bool) -> weights._Target:
    spec = weights.TensorSpec(name, torch.uint8, (end - begin,), begin, end)
    return weights._Target(spec, torch.empty(end - begin, dtype=torch.uint8), direct)


def test_ranges_never_cut_a_converted_tensor_and_cover_only_the_spans() -> None:
    """Ranges of 4 blocks of 100 bytes: the converted tensor over bytes 350..920 is read by one
    job (the cut moves to the first block boundary after it); with spans, only the blocks that
    hold them are read."""
    blocks = store.Blocks(100, ("x",) * 20, "blake3")
    targets = [
        _target("a", 0, 350, direct=True),
        _target("b", 350, 920, direct=False),
        _target("c", 920, 2000, direct=True),
    ]
    job = weights._Job(0, Path("shard"), targets, blocks, 100)
    bounds = [(part.begin, part.end) for part in job.ranges(2000, 400)]
    assert bounds == [(0, 1000), (1000, 1400), (1400, 1800), (1800, 2000)]
    job.spans = [(0, 40), (1210, 1290), (1290, 1350)]
    assert [(p.begin, p.end) for p in job.ranges(2000, 400)] == [(0, 100), (1200, 1400)]


def test_a_part_read_short_is_refused() -> None:
    """Parts: the blocks read must be every block that holds a span (a file cut short after its
    size was checked reads fewer, and would otherwise pass)."""
    blocks = store.Blocks(100, ("d0", "d1", "d2", "d3"), "blake3")
    entry = store.FileEntry("s.safetensors", 400, "0" * 64, blocks)
    spans = [(0, 50), (210, 390)]
    whole = weights.StreamResult(300, None, ("d0", "d2", "d3"), (0, 2, 3))
    assert weights._problem(entry, whole, spans) is None
    short = weights.StreamResult(100, None, ("d0",), (0,))
    assert "1 blocks (100 bytes) read of the 3 (300 bytes)" in (
        weights._problem(entry, short, spans) or ""
    )
    bad = weights.StreamResult(300, None, ("d0", "xx", "d3"), (0, 2, 3))
    assert "in block 2 " in (weights._problem(entry, bad, spans) or "")
