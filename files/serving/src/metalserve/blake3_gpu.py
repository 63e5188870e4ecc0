"""BLAKE3 of whole blocks on a CUDA device (Triton kernels), for manifest format 3's block digests.

The loader copies every read to the device anyway; hashing it there verifies the very bytes the
weights are copied from, and spares the host a second pass over memory (on the H200 host the
hashing threads, not the copies, capped a warm load: BENCHMARKS.md round 2, step 7).

A block of ``2**k`` BLAKE3 chunks (1 KiB each) is one message: every chunk is compressed on its
own (counter = its index in the block), then chunk chaining values are merged pairwise into a
perfect binary tree whose root, compressed with the ROOT flag, gives the 32-byte digest. The
first kernel compresses ``SUBTREE`` chunks per program and merges them into one subtree value;
the second merges a block's subtrees into its root. Blocks of other sizes, and the short last
block of a file, are hashed on the host by the ``blake3`` package, which is also the reference
the tests compare with.
"""

from __future__ import annotations

import blake3
import torch
import triton
import triton.language as tl

CHUNK_BYTES = 1024
# Chunks compressed (and merged) by one program of the first kernel.
SUBTREE = 64
SUBTREE_BYTES = SUBTREE * CHUNK_BYTES
# Subtrees per block the second kernel merges in one program: blocks up to 64 MiB.
MAX_SUBTREES = 1024

# What the kernels read of the module must be a Triton constexpr. BLAKE3's flags, as literals
# there: CHUNK_START 1, CHUNK_END 2, PARENT 4, ROOT 8.
_CHUNK_WORDS = tl.constexpr(CHUNK_BYTES // 4)


def supports(block_size: int) -> bool:
    """Whether blocks of this many bytes are hashed here: a power of two of whole subtrees."""
    subtrees = block_size // SUBTREE_BYTES
    return (
        block_size % SUBTREE_BYTES == 0
        and 2 <= subtrees <= MAX_SUBTREES
        and subtrees & (subtrees - 1) == 0
    )


@triton.jit
def _word(at, k: tl.constexpr):
    """The little-endian 32-bit words at ``at + k`` (int32 pointers) as unsigned."""
    return tl.load(at + k).to(tl.uint32, bitcast=True)


@triton.jit
def _rotr(x, n: tl.constexpr):
    return (x >> n) | (x << (32 - n))


@triton.jit
def _g(a, b, c, d, mx, my):
    a = a + b + mx
    d = _rotr(d ^ a, 16)
    c = c + d
    b = _rotr(b ^ c, 12)
    a = a + b + my
    d = _rotr(d ^ a, 8)
    c = c + d
    b = _rotr(b ^ c, 7)
    return a, b, c, d


@triton.jit
def _compress(
    c0, c1, c2, c3, c4, c5, c6, c7,
    m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
    counter, flags: tl.constexpr,
):  # fmt: skip
    """The compression function for a 64-byte block at ``counter`` (< 2**32); returns the new
    chaining value (the output's first 8 words)."""
    zero = c0 * 0
    s0, s1, s2, s3, s4, s5, s6, s7 = c0, c1, c2, c3, c4, c5, c6, c7
    s8 = zero + 0x6A09E667
    s9 = zero + 0xBB67AE85
    s10 = zero + 0x3C6EF372
    s11 = zero + 0xA54FF53A
    s12 = counter
    s13 = zero
    s14 = zero + 64
    s15 = zero + flags
    for _ in tl.static_range(7):
        s0, s4, s8, s12 = _g(s0, s4, s8, s12, m0, m1)
        s1, s5, s9, s13 = _g(s1, s5, s9, s13, m2, m3)
        s2, s6, s10, s14 = _g(s2, s6, s10, s14, m4, m5)
        s3, s7, s11, s15 = _g(s3, s7, s11, s15, m6, m7)
        s0, s5, s10, s15 = _g(s0, s5, s10, s15, m8, m9)
        s1, s6, s11, s12 = _g(s1, s6, s11, s12, m10, m11)
        s2, s7, s8, s13 = _g(s2, s7, s8, s13, m12, m13)
        s3, s4, s9, s14 = _g(s3, s4, s9, s14, m14, m15)
        # BLAKE3's message permutation, between rounds (once more after the last: unused).
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15 = (
            m2, m6, m3, m10, m7, m0, m4, m13, m1, m11, m12, m5, m9, m14, m15, m8
        )  # fmt: skip
    return s0 ^ s8, s1 ^ s9, s2 ^ s10, s3 ^ s11, s4 ^ s12, s5 ^ s13, s6 ^ s14, s7 ^ s15


@triton.jit
def _halve(x, N: tl.constexpr):
    """Even and odd elements of a vector of N."""
    return tl.split(tl.reshape(x, (N // 2, 2)))


@triton.jit
def _merge(c0, c1, c2, c3, c4, c5, c6, c7, N: tl.constexpr, flags: tl.constexpr):
    """One level of the tree: N chaining values (each word a vector of N) into N / 2 parents."""
    l0, r0 = _halve(c0, N)
    l1, r1 = _halve(c1, N)
    l2, r2 = _halve(c2, N)
    l3, r3 = _halve(c3, N)
    l4, r4 = _halve(c4, N)
    l5, r5 = _halve(c5, N)
    l6, r6 = _halve(c6, N)
    l7, r7 = _halve(c7, N)
    zero = l0 * 0
    return _compress(
        zero + 0x6A09E667, zero + 0xBB67AE85, zero + 0x3C6EF372, zero + 0xA54FF53A,
        zero + 0x510E527F, zero + 0x9B05688C, zero + 0x1F83D9AB, zero + 0x5BE0CD19,
        l0, l1, l2, l3, l4, l5, l6, l7, r0, r1, r2, r3, r4, r5, r6, r7,
        zero, flags,
    )  # fmt: skip


@triton.jit
def _subtrees_kernel(data, out, CHUNKS_PER_BLOCK: tl.constexpr, SUB: tl.constexpr):
    """Program p: chunks [p * SUB, (p + 1) * SUB) of ``data`` (int32 words) merged into subtree p's
    chaining value, ``out[p * 8 : p * 8 + 8]``."""
    pid = tl.program_id(0)
    chunk = pid * SUB + tl.arange(0, SUB)
    counter = (chunk % CHUNKS_PER_BLOCK).to(tl.uint32)
    base = data + chunk.to(tl.int64) * _CHUNK_WORDS
    zero = counter * 0
    c0 = zero + 0x6A09E667
    c1 = zero + 0xBB67AE85
    c2 = zero + 0x3C6EF372
    c3 = zero + 0xA54FF53A
    c4 = zero + 0x510E527F
    c5 = zero + 0x9B05688C
    c6 = zero + 0x1F83D9AB
    c7 = zero + 0x5BE0CD19
    for j in tl.static_range(16):
        w = base + j * 16
        c0, c1, c2, c3, c4, c5, c6, c7 = _compress(
            c0, c1, c2, c3, c4, c5, c6, c7,
            _word(w, 0), _word(w, 1), _word(w, 2), _word(w, 3),
            _word(w, 4), _word(w, 5), _word(w, 6), _word(w, 7),
            _word(w, 8), _word(w, 9), _word(w, 10), _word(w, 11),
            _word(w, 12), _word(w, 13), _word(w, 14), _word(w, 15),
            counter,
            (1 if j == 0 else 0) | (2 if j == 15 else 0),  # CHUNK_START, CHUNK_END
        )  # fmt: skip
    c0, c1, c2, c3, c4, c5, c6, c7 = _reduce(c0, c1, c2, c3, c4, c5, c6, c7, SUB, 4)  # PARENT
    _store(out + pid * 8 + tl.arange(0, 1), c0, c1, c2, c3, c4, c5, c6, c7)


@triton.jit
def _roots_kernel(subtrees, out, SUBTREES: tl.constexpr):
    """Program p: block p's SUBTREES subtree chaining values merged into its root, ``out[p * 8 :
    p * 8 + 8]``: the block's BLAKE3 digest as 8 little-endian words."""
    pid = tl.program_id(0)
    at = subtrees + (pid * SUBTREES + tl.arange(0, SUBTREES)).to(tl.int64) * 8
    c0, c1, c2, c3 = _word(at, 0), _word(at, 1), _word(at, 2), _word(at, 3)
    c4, c5, c6, c7 = _word(at, 4), _word(at, 5), _word(at, 6), _word(at, 7)
    c0, c1, c2, c3, c4, c5, c6, c7 = _reduce(
        c0,
        c1,
        c2,
        c3,
        c4,
        c5,
        c6,
        c7,
        SUBTREES,
        12,  # PARENT | ROOT
    )
    _store(out + pid * 8 + tl.arange(0, 1), c0, c1, c2, c3, c4, c5, c6, c7)


@triton.jit
def _reduce(c0, c1, c2, c3, c4, c5, c6, c7, N: tl.constexpr, LAST_FLAGS: tl.constexpr):
    """N chaining values (a power of two, 2 to 1024) merged level by level into one; the last
    merge with LAST_FLAGS."""
    if N >= 1024:
        c0, c1, c2, c3, c4, c5, c6, c7 = _merge(c0, c1, c2, c3, c4, c5, c6, c7, 1024, 4)
    if N >= 512:
        c0, c1, c2, c3, c4, c5, c6, c7 = _merge(c0, c1, c2, c3, c4, c5, c6, c7, 512, 4)
    if N >= 256:
        c0, c1, c2, c3, c4, c5, c6, c7 = _merge(c0, c1, c2, c3, c4, c5, c6, c7, 256, 4)
    if N >= 128:
        c0, c1, c2, c3, c4, c5, c6, c7 = _merge(c0, c1, c2, c3, c4, c5, c6, c7, 128, 4)
    if N >= 64:
        c0, c1, c2, c3, c4, c5, c6, c7 = _merge(c0, c1, c2, c3, c4, c5, c6, c7, 64, 4)
    if N >= 32:
        c0, c1, c2, c3, c4, c5, c6, c7 = _merge(c0, c1, c2, c3, c4, c5, c6, c7, 32, 4)
    if N >= 16:
        c0, c1, c2, c3, c4, c5, c6, c7 = _merge(c0, c1, c2, c3, c4, c5, c6, c7, 16, 4)
    if N >= 8:
        c0, c1, c2, c3, c4, c5, c6, c7 = _merge(c0, c1, c2, c3, c4, c5, c6, c7, 8, 4)
    if N >= 4:
        c0, c1, c2, c3, c4, c5, c6, c7 = _merge(c0, c1, c2, c3, c4, c5, c6, c7, 4, 4)
    c0, c1, c2, c3, c4, c5, c6, c7 = _merge(c0, c1, c2, c3, c4, c5, c6, c7, 2, LAST_FLAGS)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _store(at, c0, c1, c2, c3, c4, c5, c6, c7):
    tl.store(at + 0, c0.to(tl.int32, bitcast=True))
    tl.store(at + 1, c1.to(tl.int32, bitcast=True))
    tl.store(at + 2, c2.to(tl.int32, bitcast=True))
    tl.store(at + 3, c3.to(tl.int32, bitcast=True))
    tl.store(at + 4, c4.to(tl.int32, bitcast=True))
    tl.store(at + 5, c5.to(tl.int32, bitcast=True))
    tl.store(at + 6, c6.to(tl.int32, bitcast=True))
    tl.store(at + 7, c7.to(tl.int32, bitcast=True))


def hash_blocks(data: torch.Tensor, block_size: int) -> torch.Tensor:
    """The BLAKE3 digest of each ``block_size`` block of ``data`` (bytes, a whole number of
    blocks, on a CUDA device; ``supports(block_size)``), as an int32 tensor [blocks, 8] on the
    device, queued on the current stream: ``digests_hex`` turns it into hex once synchronized."""
    if not supports(block_size):
        raise ValueError(f"blocks of {block_size} bytes are not hashed on the device")
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() % block_size:
        raise ValueError("data must be a flat uint8 tensor of whole blocks")
    blocks = data.numel() // block_size
    words = data.view(torch.int32)
    subtrees = torch.empty(
        (data.numel() // SUBTREE_BYTES, 8), dtype=torch.int32, device=data.device
    )
    _subtrees_kernel[(subtrees.shape[0],)](
        words, subtrees, CHUNKS_PER_BLOCK=block_size // CHUNK_BYTES, SUB=SUBTREE, num_warps=2
    )
    roots = torch.empty((blocks, 8), dtype=torch.int32, device=data.device)
    _roots_kernel[(blocks,)](subtrees, roots, SUBTREES=block_size // SUBTREE_BYTES, num_warps=4)
    return roots


def digests_hex(roots: torch.Tensor) -> list[str]:
    """``hash_blocks``' result as one lowercase hex digest per block."""
    raw = roots.cpu().contiguous().numpy().astype("<i4").tobytes()
    return [raw[i : i + 32].hex() for i in range(0, len(raw), 32)]


def self_test() -> None:
    """Hash a known message of two subtrees on the current CUDA device; raise unless the digest
    is the ``blake3`` package's (a GPU or Triton build the kernels do not run on)."""
    data = (torch.arange(2 * SUBTREE_BYTES) % 251).to(torch.uint8)
    want = blake3.blake3(data.numpy().tobytes()).hexdigest()
    got = digests_hex(hash_blocks(data.cuda(), data.numel()))[0]
    if got != want:
        raise RuntimeError(f"device digest {got[:16]}… != the blake3 package's {want[:16]}…")
