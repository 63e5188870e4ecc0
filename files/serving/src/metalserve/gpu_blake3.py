# mypy: allow-untyped-defs, allow-incomplete-defs
# (the Triton kernels below take untyped parameters: Triton reads annotations as types)
"""BLAKE3 of every block of a contiguous uint8 tensor, on the device that holds it (Triton).

The digests are the standard BLAKE3 hash (32 bytes, unkeyed), as the ``blake3`` package computes
it, of each ``block_size`` bytes of the tensor (the last block may be shorter): what manifest
format 3 lists per block (``store.Blocks``). The weight loader uses it to hash, on the GPU, the
very bytes that arrived there, instead of re-reading every byte of the host buffers on CPU
threads after the copy (``weights.py``).

Two kernels per call, launched on the current stream, nothing waited for:

* ``_chunk_kernel``: one lane per 1024-byte chunk of every block (16 compressions of 64-byte
  blocks, CHUNK_START on the first, CHUNK_END on the last, the chunk's index in its block as the
  counter); a block of at most one chunk is its own root (ROOT on its last compression).
* ``_tree_kernel``: one program per block reduces its chunks' chaining values level by level
  (PARENT; ROOT on the last level) in place in global memory, a barrier between the levels. BLAKE3's
  tree (the left subtree holds the largest power of two of chunks that leaves the right one
  non-empty) is exactly pairwise reduction left to right with an odd node carried up unchanged,
  so partial blocks of any length are hashed on the device too.

The seven rounds of a compression run in a loop that is not unrolled, the message permutation
applied as a reassignment of the 16 loop-carried words: a version that unrolled every round of
every block did not finish compiling in 10 minutes.

``blake3_blocks`` returns a device tensor of digests (int32 words, ``[blocks, 8]``); call
``hexdigests`` once its work is done (it copies to the host, so it waits for the stream).
Without Triton (the project's CI), ``available`` says so and nothing here can run; with
``TRITON_INTERPRET=1`` set before this module is imported, the kernels run on CPU tensors in
Triton's interpreter (slow: for tests).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch

from metalserve import triton_warmup

try:
    import triton  # type: ignore[import-not-found, unused-ignore]
    import triton.language as tl  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # no Triton: the project's CI and CPU-only hosts
    triton = None
    tl = None

CHUNK_LEN = 1024
DIGEST_WORDS = 8
# Chunks per program of the chunk kernel, and parent nodes per step of the tree kernel's one
# program per block.
CHUNK_LANES = 128
TREE_LANES = 512
CHUNK_WARPS = 4
TREE_WARPS = 8
# In Triton's interpreter every operation costs the same whatever the lanes: many per program.
INTERPRETED_LANES = 8192
IV = (
    0x6A09E667,
    0xBB67AE85,
    0x3C6EF372,
    0xA54FF53A,
    0x510E527F,
    0x9B05688C,
    0x1F83D9AB,
    0x5BE0CD19,
)
# Domain flags
CHUNK_START = 1
CHUNK_END = 2
PARENT = 4
ROOT = 8

# Launches from several reader threads: one at a time (the first one compiles; a launch holds the
# GIL for most of its few microseconds anyway).
_LOCK = threading.Lock()
# Seconds the kernels took to compile (or load from Triton's cache) on their first launch.
compile_seconds: dict[str, float] = {}


# Triton decides when a kernel is defined (this module's import) whether it runs interpreted.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (on CPU tensors)."""
    return triton is not None and _INTERPRETED


def missing(device: torch.device) -> str | None:
    """Why the kernels cannot hash tensors on ``device``, or None when they can."""
    if triton is None:
        return "triton is not installed"
    if device.type == "cuda":
        if _INTERPRETED:
            return "TRITON_INTERPRET=1 runs the kernels on CPU tensors only"
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        return (
            None if _INTERPRETED else "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"
        )
    return f"no Triton backend for {device.type}"


def available(device: torch.device) -> bool:
    return missing(device) is None


if triton is not None:
    _IV0 = tl.constexpr(IV[0])
    _IV1 = tl.constexpr(IV[1])
    _IV2 = tl.constexpr(IV[2])
    _IV3 = tl.constexpr(IV[3])
    _IV4 = tl.constexpr(IV[4])
    _IV5 = tl.constexpr(IV[5])
    _IV6 = tl.constexpr(IV[6])
    _IV7 = tl.constexpr(IV[7])

    @triton.jit
    def _g(a, b, c, d, x, y):
        a = a + b + x
        d = d ^ a
        d = (d >> 16) | (d << 16)
        c = c + d
        b = b ^ c
        b = (b >> 12) | (b << 20)
        a = a + b + y
        d = d ^ a
        d = (d >> 8) | (d << 24)
        c = c + d
        b = b ^ c
        b = (b >> 7) | (b << 25)
        return a, b, c, d

    @triton.jit
    def _compress(
        h0, h1, h2, h3, h4, h5, h6, h7,
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
        counter, block_len, flags, LANES: tl.constexpr,
    ):  # fmt: skip
        """The compression function's first 8 output words (the chaining value; for the root
        with ROOT in ``flags``, the 32-byte digest). All arguments uint32 of shape [LANES]."""
        s0, s1, s2, s3, s4, s5, s6, s7 = h0, h1, h2, h3, h4, h5, h6, h7
        s8 = tl.full([LANES], _IV0, tl.uint32)
        s9 = tl.full([LANES], _IV1, tl.uint32)
        s10 = tl.full([LANES], _IV2, tl.uint32)
        s11 = tl.full([LANES], _IV3, tl.uint32)
        s12 = counter
        s13 = tl.zeros([LANES], tl.uint32)
        s14 = block_len
        s15 = flags
        for _ in range(7):  # not unrolled: see the module's docstring
            s0, s4, s8, s12 = _g(s0, s4, s8, s12, m0, m1)
            s1, s5, s9, s13 = _g(s1, s5, s9, s13, m2, m3)
            s2, s6, s10, s14 = _g(s2, s6, s10, s14, m4, m5)
            s3, s7, s11, s15 = _g(s3, s7, s11, s15, m6, m7)
            s0, s5, s10, s15 = _g(s0, s5, s10, s15, m8, m9)
            s1, s6, s11, s12 = _g(s1, s6, s11, s12, m10, m11)
            s2, s7, s8, s13 = _g(s2, s7, s8, s13, m12, m13)
            s3, s4, s9, s14 = _g(s3, s4, s9, s14, m14, m15)
            # The message permutation (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8).
            m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = (
                m2, m6, m3, m10, m7, m0, m4, m13, m1, m11, m12, m5, m9, m14, m15, m8,
            )  # fmt: skip
        return s0 ^ s8, s1 ^ s9, s2 ^ s10, s3 ^ s11, s4 ^ s12, s5 ^ s13, s6 ^ s14, s7 ^ s15

    @triton.jit
    def _word(data, start, index, left):
        """Message word ``index`` of the 64-byte block at word ``start`` (int64); zero past the
        block's ``left`` bytes (the bytes past the end of the last partial word are zero in
        the buffer: see ``_words``)."""
        word = tl.load(data + start + index, mask=index * 4 < left, other=0)
        return word.to(tl.uint32, bitcast=True)

    @triton.jit(do_not_specialize=["block_len", "stride", "chunks", "per_block", "root"])
    def _chunk_kernel(data, out, block_len, stride, chunks, per_block, root, LANES: tl.constexpr):
        """Chaining value (or, with ``root`` = ROOT, the digest) of each chunk.

        ``data``: int32 words; block ``b`` starts at word ``b * stride`` and holds ``block_len``
        bytes in ``per_block`` chunks; ``chunks`` = blocks x per_block lanes in all; ``out``:
        int32 [chunks, 8].
        """
        lane = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
        live = lane < chunks
        block = lane // per_block
        chunk = lane - block * per_block
        length = tl.where(live, tl.minimum(block_len - chunk * 1024, 1024), 0)
        last = tl.maximum((length + 63) // 64, 1) - 1  # index of the chunk's last 64-byte block
        base = block * stride + chunk * 256  # in words
        counter = chunk.to(tl.uint32)
        h0 = tl.full([LANES], _IV0, tl.uint32)
        h1 = tl.full([LANES], _IV1, tl.uint32)
        h2 = tl.full([LANES], _IV2, tl.uint32)
        h3 = tl.full([LANES], _IV3, tl.uint32)
        h4 = tl.full([LANES], _IV4, tl.uint32)
        h5 = tl.full([LANES], _IV5, tl.uint32)
        h6 = tl.full([LANES], _IV6, tl.uint32)
        h7 = tl.full([LANES], _IV7, tl.uint32)
        for k in range(16):
            left = tl.where(live, length - k * 64, 0)
            start = base + k * 16
            n0, n1, n2, n3, n4, n5, n6, n7 = _compress(
                h0, h1, h2, h3, h4, h5, h6, h7,
                _word(data, start, 0, left), _word(data, start, 1, left),
                _word(data, start, 2, left), _word(data, start, 3, left),
                _word(data, start, 4, left), _word(data, start, 5, left),
                _word(data, start, 6, left), _word(data, start, 7, left),
                _word(data, start, 8, left), _word(data, start, 9, left),
                _word(data, start, 10, left), _word(data, start, 11, left),
                _word(data, start, 12, left), _word(data, start, 13, left),
                _word(data, start, 14, left), _word(data, start, 15, left),
                counter,
                tl.minimum(tl.maximum(left, 0), 64).to(tl.uint32),
                (
                    tl.where(k == 0, 1, 0)
                    | tl.where(k == last, 2 + root, 0)
                ).to(tl.uint32),
                LANES,
            )  # fmt: skip
            active = k <= last
            h0 = tl.where(active, n0, h0)
            h1 = tl.where(active, n1, h1)
            h2 = tl.where(active, n2, h2)
            h3 = tl.where(active, n3, h3)
            h4 = tl.where(active, n4, h4)
            h5 = tl.where(active, n5, h5)
            h6 = tl.where(active, n6, h6)
            h7 = tl.where(active, n7, h7)
        dest = out + lane * 8
        tl.store(dest + 0, h0.to(tl.int32, bitcast=True), mask=live)
        tl.store(dest + 1, h1.to(tl.int32, bitcast=True), mask=live)
        tl.store(dest + 2, h2.to(tl.int32, bitcast=True), mask=live)
        tl.store(dest + 3, h3.to(tl.int32, bitcast=True), mask=live)
        tl.store(dest + 4, h4.to(tl.int32, bitcast=True), mask=live)
        tl.store(dest + 5, h5.to(tl.int32, bitcast=True), mask=live)
        tl.store(dest + 6, h6.to(tl.int32, bitcast=True), mask=live)
        tl.store(dest + 7, h7.to(tl.int32, bitcast=True), mask=live)

    @triton.jit
    def _node(base, index, mask):
        """The 8 words of node ``index`` (int64 [LANES]) of the level in ``base``."""
        at = base + index * 8
        w0 = tl.load(at + 0, mask=mask, other=0, cache_modifier=".cg")
        w1 = tl.load(at + 1, mask=mask, other=0, cache_modifier=".cg")
        w2 = tl.load(at + 2, mask=mask, other=0, cache_modifier=".cg")
        w3 = tl.load(at + 3, mask=mask, other=0, cache_modifier=".cg")
        w4 = tl.load(at + 4, mask=mask, other=0, cache_modifier=".cg")
        w5 = tl.load(at + 5, mask=mask, other=0, cache_modifier=".cg")
        w6 = tl.load(at + 6, mask=mask, other=0, cache_modifier=".cg")
        w7 = tl.load(at + 7, mask=mask, other=0, cache_modifier=".cg")
        return (
            w0.to(tl.uint32, bitcast=True), w1.to(tl.uint32, bitcast=True),
            w2.to(tl.uint32, bitcast=True), w3.to(tl.uint32, bitcast=True),
            w4.to(tl.uint32, bitcast=True), w5.to(tl.uint32, bitcast=True),
            w6.to(tl.uint32, bitcast=True), w7.to(tl.uint32, bitcast=True),
        )  # fmt: skip

    @triton.jit(do_not_specialize=["per_block", "levels"])
    def _tree_kernel(cvs, out, per_block, levels, LANES: tl.constexpr):
        """Each block's digest from its ``per_block`` (> 1) chunk chaining values (``cvs``: int32
        [blocks * per_block, 8], overwritten) in ``levels`` = ceil(log2(per_block)) levels."""
        block = tl.program_id(0).to(tl.int64)
        base = cvs + block * per_block * 8
        lanes = tl.arange(0, LANES).to(tl.int64)
        nodes = per_block.to(tl.int64)
        key0 = tl.full([LANES], _IV0, tl.uint32)
        key1 = tl.full([LANES], _IV1, tl.uint32)
        key2 = tl.full([LANES], _IV2, tl.uint32)
        key3 = tl.full([LANES], _IV3, tl.uint32)
        key4 = tl.full([LANES], _IV4, tl.uint32)
        key5 = tl.full([LANES], _IV5, tl.uint32)
        key6 = tl.full([LANES], _IV6, tl.uint32)
        key7 = tl.full([LANES], _IV7, tl.uint32)
        for _ in range(levels):
            parents = (nodes + 1) // 2
            flags = tl.full([LANES], 4, tl.uint32) | tl.where(nodes == 2, 8, 0).to(tl.uint32)
            for first in range(0, parents, LANES):
                i = first + lanes
                valid = i < parents
                pair = valid & (2 * i + 1 < nodes)
                l0, l1, l2, l3, l4, l5, l6, l7 = _node(base, 2 * i, valid)
                r0, r1, r2, r3, r4, r5, r6, r7 = _node(base, 2 * i + 1, pair)
                p0, p1, p2, p3, p4, p5, p6, p7 = _compress(
                    key0, key1, key2, key3, key4, key5, key6, key7,
                    l0, l1, l2, l3, l4, l5, l6, l7, r0, r1, r2, r3, r4, r5, r6, r7,
                    tl.zeros([LANES], tl.uint32), tl.full([LANES], 64, tl.uint32), flags, LANES,
                )  # fmt: skip
                # Node i is written where node 2i or 2i + 1 of this step may not be read yet:
                # every lane's reads first. (Later steps read nodes past every write of this one.)
                tl.debug_barrier()
                at = base + i * 8
                tl.store(at + 0, tl.where(pair, p0, l0).to(tl.int32, bitcast=True), mask=valid)
                tl.store(at + 1, tl.where(pair, p1, l1).to(tl.int32, bitcast=True), mask=valid)
                tl.store(at + 2, tl.where(pair, p2, l2).to(tl.int32, bitcast=True), mask=valid)
                tl.store(at + 3, tl.where(pair, p3, l3).to(tl.int32, bitcast=True), mask=valid)
                tl.store(at + 4, tl.where(pair, p4, l4).to(tl.int32, bitcast=True), mask=valid)
                tl.store(at + 5, tl.where(pair, p5, l5).to(tl.int32, bitcast=True), mask=valid)
                tl.store(at + 6, tl.where(pair, p6, l6).to(tl.int32, bitcast=True), mask=valid)
                tl.store(at + 7, tl.where(pair, p7, l7).to(tl.int32, bitcast=True), mask=valid)
            tl.debug_barrier()  # the level is written before the next one reads it
            nodes = parents
        words = tl.arange(0, 8)
        root = tl.load(base + words, cache_modifier=".cg")
        tl.store(out + block * 8 + words, root)


def _words(data: torch.Tensor, block_len: int, blocks: int) -> tuple[torch.Tensor, int]:
    """``blocks`` blocks of ``block_len`` bytes at the start of ``data`` as int32 words, and the
    words from one block's start to the next's. The kernels read whole words: where a block does
    not start on a word or end on one, the blocks are copied to zero-padded rows (a copy of at
    most one block in the loader: the file's last, shorter one)."""
    stride = -(-block_len // 4)
    size = block_len * blocks
    if block_len % 4 == 0 and data.data_ptr() % 4 == 0 and size > 0:
        return data[:size].view(torch.int32), stride
    padded = torch.zeros((max(blocks, 1), stride * 4), dtype=torch.uint8, device=data.device)
    if size:
        padded[:, :block_len].copy_(data[:size].view(blocks, block_len))
    return padded.view(-1).view(torch.int32), stride


def _launch(data: torch.Tensor, block_len: int, blocks: int, out: torch.Tensor) -> None:
    """Digests of ``blocks`` blocks of ``block_len`` bytes at the start of ``data`` into ``out``
    (int32 [blocks, 8]), on the current stream."""
    words, stride = _words(data, block_len, blocks)
    per_block = max(1, -(-block_len // CHUNK_LEN))
    chunks = blocks * per_block
    cvs = out if per_block == 1 else torch.empty((chunks, 8), dtype=torch.int32, device=out.device)
    with _LOCK, torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        first = "chunk" not in compile_seconds
        started = time.perf_counter()
        lanes = INTERPRETED_LANES if _INTERPRETED else CHUNK_LANES
        _chunk_kernel[(triton.cdiv(chunks, lanes),)](
            words,
            cvs,
            block_len,
            stride,
            chunks,
            per_block,
            ROOT if per_block == 1 else 0,
            LANES=lanes,
            num_warps=CHUNK_WARPS,
        )
        if first:
            compile_seconds["chunk"] = time.perf_counter() - started
        if per_block > 1:
            first = "tree" not in compile_seconds
            started = time.perf_counter()
            levels = (per_block - 1).bit_length()
            _tree_kernel[(blocks,)](
                cvs,
                out,
                per_block,
                levels,
                LANES=INTERPRETED_LANES if _INTERPRETED else TREE_LANES,
                num_warps=TREE_WARPS,
            )
            if first:
                compile_seconds["tree"] = time.perf_counter() - started


def blake3_blocks(data: torch.Tensor, block_size: int) -> torch.Tensor:
    """BLAKE3 of each ``block_size`` bytes of ``data`` (a contiguous 1-D uint8 tensor; the last
    block may be shorter; no blocks if it is empty): int32 [blocks, 8], the digests' bytes in
    little-endian words, on ``data``'s device. Launched on the current stream; not waited for."""
    if data.dtype != torch.uint8 or data.dim() != 1 or not data.is_contiguous():
        raise ValueError("expected a contiguous 1-D uint8 tensor")
    if block_size <= 0:
        raise ValueError(f"block size {block_size} is not positive")
    problem = missing(data.device)
    if problem:
        raise RuntimeError(f"BLAKE3 on {data.device}: {problem}")
    full, tail = divmod(data.numel(), block_size)
    out = torch.empty((full + (tail > 0), 8), dtype=torch.int32, device=data.device)
    if full:
        _launch(data, block_size, full, out[:full])
    if tail:
        _launch(data[full * block_size :], tail, 1, out[full:])
    return out


def blake3_digest(data: torch.Tensor) -> torch.Tensor:
    """BLAKE3 of the whole of ``data`` (empty too): int32 [1, 8] on its device, not waited for."""
    if data.numel():
        return blake3_blocks(data, data.numel())
    problem = missing(data.device)
    if problem:
        raise RuntimeError(f"BLAKE3 on {data.device}: {problem}")
    out = torch.empty((1, 8), dtype=torch.int32, device=data.device)
    _launch(torch.zeros(4, dtype=torch.uint8, device=data.device), 0, 1, out)
    return out


def hexdigests(digests: torch.Tensor) -> list[str]:
    """The hex digests of ``blake3_blocks``' result (copies it to the host: waits for it)."""
    raw = bytes(digests.detach().cpu().contiguous().view(torch.uint8).flatten().tolist())
    return [raw[i : i + 32].hex() for i in range(0, len(raw), 32)]


_CHECKED: dict[str, str | None] = {}


def self_test(device: torch.device) -> str | None:
    """Compile the kernels for ``device`` and check them against the ``blake3`` package on a few
    inputs (a block of one chunk, a block of several, a partial block); None when they agree,
    else what is wrong. Done once per device and process."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key in _CHECKED:
        return _CHECKED[key]
    problem = missing(device)
    if problem is None:
        import blake3

        triton_warmup.wait()  # the first launch's cache key, begun with torch's import

        data = bytes((i * 7 + i // 251) % 256 for i in range(3 * 2048 + 1000))
        expected = [
            blake3.blake3(data[i : i + 2048]).hexdigest() for i in range(0, len(data), 2048)
        ]
        try:
            tensor = torch.tensor(list(data), dtype=torch.uint8, device=device)
            got = hexdigests(blake3_blocks(tensor, 2048))
            small = hexdigests(blake3_blocks(tensor[:1000], 1000))
        except Exception as exc:  # noqa: BLE001 - any failure means: do not hash on the device
            problem = f"the kernels failed: {type(exc).__name__}: {exc}"
        else:
            if got != expected or small != [blake3.blake3(data[:1000]).hexdigest()]:
                problem = "the kernels' digests differ from the blake3 package's"
    _CHECKED[key] = problem
    return problem
