"""BLAKE3 on the device (``metalserve.gpu_blake3``, Triton) against the ``blake3`` package, and the
weight loader hashing on the device (``weights.load_weights(verify_on="device")``).

These run where Triton is importable: on CUDA when there is a GPU, else on CPU tensors in Triton's
interpreter (slow: small inputs only). The project's CI has no Triton: every test here is skipped
there, naming what is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import random
import shutil
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import blake3
import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA and "triton" not in sys.modules and importlib.util.find_spec("triton") is not None:
    # Without a GPU the kernels run in Triton's interpreter, which Triton chooses when it is
    # imported (its own library functions too) and when a kernel is defined: set for the rest of
    # this process (nothing else here uses Triton without a GPU).
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip(
    "triton",
    reason="triton is not installed (BLAKE3 on the GPU needs it; the project's CI has none, "
    "the GPU machine has)",
)
if not CUDA:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "no CUDA device, and triton was imported before TRITON_INTERPRET=1 could be set "
            "(run this file alone, or with TRITON_INTERPRET=1)",
            allow_module_level=True,
        )
    # Triton 3.6's interpreter turns integer arguments into 1-element arrays and calls int() on
    # them, which numpy 2.4 refuses.
    numpy = pytest.importorskip("numpy", reason="Triton's interpreter needs numpy")
    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip(
            f"no CUDA device, and Triton's interpreter fails with numpy {numpy.__version__} "
            "(>= 2.4)",
            allow_module_level=True,
        )

from metalserve import store, weights  # noqa: E402


def _gpu_blake3() -> ModuleType:
    """The module, with its kernels defined for the interpreter when there is no GPU (and for
    the GPU when there is), even if another test imported it first."""
    module = importlib.import_module("metalserve.gpu_blake3")
    if module.interpreted() != (not CUDA):
        module = importlib.reload(module)
    return module


gpu_blake3 = _gpu_blake3()


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _expected(data: bytes, block: int) -> list[str]:
    return [blake3.blake3(data[i : i + block]).hexdigest() for i in range(0, len(data), block)]


def _tensor(data: bytes) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).to(DEVICE)
        if data
        else (torch.empty(0, dtype=torch.uint8, device=DEVICE))
    )


# (bytes, block size): one byte; 1 KiB blocks (one chunk each: the chunk is the root); 2 KiB
# blocks and a tail of 5 bytes; 64 KiB blocks (a tree of 64 chunks) and a tail of 777 bytes in a
# partial chunk; blocks of 3 chunks and 5 bytes (not a power of two, not a whole word) and a tail
# of one full chunk plus 3 bytes.
CASES = [
    (1, 1024),
    (4 * 1024, 1024),
    (2 * 2048 + 5, 2048),
    (3 * 65536 + 777, 65536),
    (2 * 3077 + 1027, 3077),
]


@pytest.mark.parametrize(("size", "block"), CASES, ids=[f"{s}b-in-{b}" for s, b in CASES])
def test_block_digests_equal_the_blake3_package(size: int, block: int) -> None:
    data = _random(size, size)
    digests = gpu_blake3.blake3_blocks(_tensor(data), block)
    assert digests.device.type == DEVICE.type
    assert digests.shape == (-(-size // block), 8)
    assert gpu_blake3.hexdigests(digests) == _expected(data, block)


def test_unaligned_input_and_empty_input() -> None:
    data = _random(4096 + 3, 7)
    # A view that starts one byte into its storage: not on a word.
    shifted = _tensor(b"\0" + data)[1:]
    assert gpu_blake3.hexdigests(gpu_blake3.blake3_blocks(shifted, 2048)) == _expected(data, 2048)
    empty = torch.empty(0, dtype=torch.uint8, device=DEVICE)
    assert gpu_blake3.blake3_blocks(empty, 1024).shape == (0, 8)
    assert gpu_blake3.hexdigests(gpu_blake3.blake3_digest(empty)) == [blake3.blake3().hexdigest()]


def test_self_test_passes_and_bad_arguments_are_refused() -> None:
    assert gpu_blake3.missing(DEVICE) is None
    assert gpu_blake3.self_test(DEVICE) is None
    with pytest.raises(ValueError, match="contiguous 1-D uint8"):
        gpu_blake3.blake3_blocks(torch.zeros(4, dtype=torch.int32, device=DEVICE), 1024)
    with pytest.raises(ValueError, match="not positive"):
        gpu_blake3.blake3_blocks(torch.zeros(4, dtype=torch.uint8, device=DEVICE), 0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (too slow for Triton's interpreter)")
@pytest.mark.parametrize("block", [16 * 2**20, 2**20 + 3, 4096])
def test_large_input_on_cuda(block: int) -> None:
    size = 2**30 + 12345  # a GiB and a partial last block
    generator = torch.Generator(device="cuda").manual_seed(block)
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda", generator=generator)
    got = gpu_blake3.hexdigests(gpu_blake3.blake3_blocks(data, block))
    host = memoryview(data.cpu().numpy())
    with ThreadPoolExecutor(store.default_threads()) as pool:
        expected = list(
            pool.map(store.blake3_hex, [host[i : i + block] for i in range(0, size, block)])
        )
    assert got == expected


# --- the loader hashing on the device ------------------------------------------------------

BLOCK = 4096  # store.MIN_BLOCK_SIZE: many blocks in a small file
MODEL = "gpu-blake3"


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    names = {torch.bfloat16: "BF16", torch.uint8: "U8", torch.float32: "F32"}
    header: dict[str, object] = {}
    blobs = []
    offset = 0
    for name, tensor in tensors.items():
        blob = bytes(tensor.contiguous().view(-1).view(torch.uint8).tolist())
        header[name] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, torch.Tensor]]:
    """One shard of ~45 KB (11 blocks of 4 KiB and a short one whose length is not a whole
    word), published as manifest format 3 in blocks of 4 KiB."""
    generator = torch.Generator().manual_seed(3)
    tensors = {
        "a.weight": torch.randn(64, 200, generator=generator).to(torch.bfloat16),
        "b.bias": torch.randint(0, 256, (4099,), dtype=torch.uint8, generator=generator),
        "c.weight": torch.randn(4000, generator=generator),
    }
    base = tmp_path_factory.mktemp("gpu-blake3")
    src = base / "src"
    src.mkdir()
    _write_safetensors(src / "model.safetensors", tensors)
    root = base / "store"
    version_id = store.publish(src, root, MODEL, block_size=BLOCK)
    (entry,) = store.read_manifest(root, MODEL, version_id).files
    assert entry.blocks is not None
    assert entry.blocks.algorithm == "blake3"
    assert len(entry.blocks.digests) == 12
    assert entry.size % 4
    return root, version_id, tensors


def _load(root: Path, version_id: str, **kwargs: object) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = {}

    def destination(spec: weights.TensorSpec) -> torch.Tensor:
        loaded[spec.name] = torch.empty(spec.shape, dtype=spec.dtype, device=DEVICE)
        return loaded[spec.name]

    options: dict[str, object] = {
        "chunk_size": 8 * BLOCK,  # reads of 8 blocks
        "range_size": 8 * BLOCK,  # two ranges (8 blocks, then 3 and the short one), two readers
        "workers": 2,
        **kwargs,
    }
    weights.load_weights(
        store.version_dir(root, MODEL, version_id),
        store.read_manifest(root, MODEL, version_id).files,
        version_id,
        destination,
        device=DEVICE,
        **options,  # type: ignore[arg-type]
    )
    return loaded


def test_load_verified_on_the_device_equals_the_tensors(
    version: tuple[Path, str, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, version_id, tensors = version
    (entry,) = store.read_manifest(root, MODEL, version_id).files
    assert gpu_blake3.self_test(DEVICE) is None  # done once per device: not counted below
    calls: list[int] = []
    hash_blocks = gpu_blake3.blake3_blocks

    def counted(data: torch.Tensor, block_size: int) -> torch.Tensor:
        calls.append(data.numel())
        return hash_blocks(data, block_size)

    monkeypatch.setattr(gpu_blake3, "blake3_blocks", counted)
    loaded = _load(root, version_id, verify_on="device")
    # Each range's reads hashed together on the device: two ranges of one read each.
    assert sorted(calls) == sorted([8 * BLOCK, entry.size - 8 * BLOCK])
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].cpu(), tensor), name
    calls.clear()
    host = _load(root, version_id, verify_on="host")
    assert not calls
    for name, tensor in tensors.items():
        assert torch.equal(host[name].cpu(), tensor), name
    calls.clear()
    _load(root, version_id)  # auto: on the device on CUDA, on the host on a CPU device
    assert bool(calls) == CUDA


def test_reads_are_hashed_in_batches_on_the_device(
    version: tuple[Path, str, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, version_id, tensors = version
    (entry,) = store.read_manifest(root, MODEL, version_id).files
    assert gpu_blake3.self_test(DEVICE) is None
    calls: list[int] = []
    hash_blocks = gpu_blake3.blake3_blocks

    def counted(data: torch.Tensor, block_size: int) -> torch.Tensor:
        calls.append(data.numel())
        return hash_blocks(data, block_size)

    monkeypatch.setattr(gpu_blake3, "blake3_blocks", counted)
    monkeypatch.setattr(weights, "DEVICE_HASH_BATCH", 6 * BLOCK)
    # One reader, reads of 3 blocks: two reads staged, hashed, then the last two (the short one).
    loaded = _load(
        root, version_id, verify_on="device", chunk_size=3 * BLOCK, range_size=2**40, workers=1
    )
    assert calls == [6 * BLOCK, entry.size - 6 * BLOCK]
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].cpu(), tensor), name


# Tensor bytes in the first block, and in the last, short one.
@pytest.mark.parametrize("at", [1000, -10], ids=["first-block", "last-block"])
def test_tampered_block_is_refused_on_the_device(
    version: tuple[Path, str, dict[str, torch.Tensor]], tmp_path: Path, at: int
) -> None:
    root, version_id, _ = version
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    shard = store.version_dir(copy, MODEL, version_id) / "model.safetensors"
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    at %= len(data)
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))
    block = at // BLOCK
    end = min((block + 1) * BLOCK, len(data)) - 1
    with pytest.raises(
        store.VerificationError,
        match=rf"model\.safetensors: blake3 [0-9a-f]{{16}}… != manifest [0-9a-f]{{16}}… "
        rf"in block {block} \(bytes {block * BLOCK}\.\.{end}\)$",
    ):
        _load(copy, version_id, verify_on="device")
