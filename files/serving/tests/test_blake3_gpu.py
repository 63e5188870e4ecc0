"""BLAKE3 block digests computed on a CUDA device (``metalserve.blake3_gpu``) against the
``blake3`` package, and the loader verifying on the device: equal tensors, a tampered block
named. Needs CUDA and Triton (CUDA builds of torch bring it); on other machines every test here
is skipped, saying so, and the host hashes (tests/test_weights.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import blake3
import pytest
import torch

from metalserve import store, weights
from metalserve.bench import load as bench_load
from metalserve.bench.options import BenchLoadSettings

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or weights.device_hasher() is None,
    reason="needs a CUDA device and Triton (the GPU machine of BENCHMARKS.md runs these)",
)

MIB = 2**20


@pytest.mark.parametrize("block_size", [128 * 1024, 16 * MIB, 64 * MIB])
def test_device_digests_equal_the_blake3_package(block_size: int) -> None:
    from metalserve import blake3_gpu

    assert blake3_gpu.supports(block_size)
    generator = torch.Generator().manual_seed(block_size)
    data = torch.randint(0, 256, (3 * block_size,), dtype=torch.uint8, generator=generator)
    want = [
        blake3.blake3(data[i * block_size : (i + 1) * block_size].numpy().tobytes()).hexdigest()
        for i in range(3)
    ]
    got = blake3_gpu.digests_hex(blake3_gpu.hash_blocks(data.cuda(), block_size))
    assert got == want
    data[block_size + 12345] ^= 1  # one bit of the second block
    again = blake3_gpu.digests_hex(blake3_gpu.hash_blocks(data.cuda(), block_size))
    assert again[0] == want[0]
    assert again[1] != want[1]
    assert again[2] == want[2]


def test_sizes_it_does_not_hash_are_refused() -> None:
    from metalserve import blake3_gpu

    for size in (64 * 1024, 3 * 64 * 1024, 262_147, 128 * MIB):
        assert not blake3_gpu.supports(size)
    with pytest.raises(ValueError, match="not hashed on the device"):
        blake3_gpu.hash_blocks(torch.zeros(262_147, dtype=torch.uint8, device="cuda"), 262_147)


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[Path]]:
    """bench load's checkpoint (64 MiB, 3 shards: each ends on a short block) in 1 MiB blocks."""
    base = tmp_path_factory.mktemp("gpu-hash")
    checkpoint = bench_load.prepare_checkpoint(
        BenchLoadSettings(dir=base / "ckpt", size_gib=1 / 16, shards=3, device="cuda")
    )
    src = base / "src"
    src.mkdir()
    for path in checkpoint.paths:
        shutil.copyfile(path, src / path.name)
    root = base / "store"
    version_id = store.publish(src, root, bench_load.MODEL, block_size=MIB)
    return root, version_id, list(checkpoint.paths)


def _load(root: Path, version_id: str, **kwargs: object) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}

    def destination(spec: weights.TensorSpec) -> torch.Tensor:
        tensors[spec.name] = torch.empty(spec.shape, dtype=spec.dtype, device="cuda")
        return tensors[spec.name]

    weights.load_weights(
        store.version_dir(root, bench_load.MODEL, version_id),
        store.read_manifest(root, bench_load.MODEL, version_id).files,
        version_id,
        destination,
        device=torch.device("cuda"),
        range_size=5 * MIB,
        **kwargs,  # type: ignore[arg-type]
    )
    return tensors


def test_the_loader_verifies_on_the_device(
    version: tuple[Path, str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from metalserve import blake3_gpu

    hashed: list[int] = []
    hash_blocks = blake3_gpu.hash_blocks

    def counting(data: torch.Tensor, block_size: int) -> torch.Tensor:
        hashed.append(data.numel() // block_size)
        return hash_blocks(data, block_size)

    monkeypatch.setattr(blake3_gpu, "hash_blocks", counting)
    root, version_id, paths = version
    entries = store.read_manifest(root, bench_load.MODEL, version_id).files
    assert all(e.blocks is not None and e.size % MIB for e in entries)  # short last blocks
    reference: dict[str, torch.Tensor] = {}
    for path in paths:
        reference.update(load_file(path))
    loaded = _load(root, version_id)
    # Every whole block on the device; the short last blocks on the host.
    assert sum(hashed) == sum(e.size // MIB for e in entries)
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded[name].cpu(), tensor), name


@pytest.mark.parametrize("where", ["whole block", "short last block"])
def test_a_tampered_block_is_named_whichever_side_hashed_it(
    version: tuple[Path, str, list[Path]], tmp_path: Path, where: str
) -> None:
    root, version_id, _ = version
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    entry = store.read_manifest(copy, bench_load.MODEL, version_id).files[0]
    shard = store.version_dir(copy, bench_load.MODEL, version_id) / entry.path
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    offset = 2 * MIB + 7 if where == "whole block" else len(data) - 3
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    block = offset // MIB
    with pytest.raises(store.VerificationError, match=rf"blake3 .* in block {block} "):
        _load(copy, version_id)
