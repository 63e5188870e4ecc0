"""Which prompt prefixes the static path keeps the keys and values of (``PrefixIndex``).

A prompt that starts as an earlier one did (a shared system prompt, the turns so far of a chat)
need not run those tokens through the model again: their keys and values depend on them alone.
The static decoder keeps the keys and values of prompts' leading blocks of ``BLOCK_TOKENS`` tokens
in a device pool (``staticdecode.StaticDecoder``), copies the longest cached run of blocks into a
new sequence's slot and prefills only the rest.

A block is named by a hash of every token from the prompt's start to the block's end (a chain),
so it is reused only after the very same prefix; a block whose earlier blocks were evicted stays
valid (its name still says what it holds) until it is evicted itself. Eviction is least recently
used; a lookup or a store touches its blocks deepest first, so a prefix's first blocks outlive
its later ones.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable

BLOCK_TOKENS = 16
# The serving default (``serve --prefix-cache-tokens``; the engine's too).
DEFAULT_TOKENS = 8192


class PrefixIndex:
    """The names of the pool's ``blocks`` blocks (host side; the decoder holds the tensors)."""

    def __init__(self, blocks: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if blocks < 1 or block_tokens < 1:
            raise ValueError("a prefix cache needs at least one block of at least one token")
        self.blocks = blocks
        self.block_tokens = block_tokens
        self._where: OrderedDict[bytes, int] = OrderedDict()  # name -> pool block, LRU first
        self._free = list(range(blocks - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._where)

    def names(self, ids: list[int]) -> list[bytes]:
        """The chain names of the whole blocks of ``ids``."""
        names: list[bytes] = []
        name = b""
        size = self.block_tokens
        for end in range(size, len(ids) + 1, size):
            block = array("q", ids[end - size : end]).tobytes()
            name = hashlib.blake2b(name + block, digest_size=16).digest()
            names.append(name)
        return names

    def match(self, names: list[bytes]) -> list[int]:
        """Pool blocks of the longest cached run of ``names`` from the first (touched)."""
        found: list[int] = []
        for name in names:
            block = self._where.get(name)
            if block is None:
                break
            found.append(block)
        self._touch(names[: len(found)])
        return found

    def claim(self, names: list[bytes], claimed: set[int]) -> list[tuple[int, int]]:
        """(block number, pool block) for each of ``names`` not cached yet, evicting the least
        recently used blocks; none of ``claimed`` (blocks claimed for this same prefill, whose
        contents are not written yet) is evicted: what does not fit is left out."""
        taken: list[tuple[int, int]] = []
        for number, name in enumerate(names):
            if name in self._where:
                continue
            block = self._take(claimed)
            if block is None:
                break
            self._where[name] = block
            claimed.add(block)
            taken.append((number, block))
        self._touch(names)
        return taken

    def forget(self, blocks: Iterable[int]) -> None:
        """Drop whatever names ``blocks`` (claimed, their contents never written)."""
        doomed = set(blocks)
        for name in [n for n, b in self._where.items() if b in doomed]:
            del self._where[name]
        self._free.extend(doomed)

    def _touch(self, names: list[bytes]) -> None:
        """Mark ``names`` used, deepest first: a prefix's first blocks become the most recent."""
        for name in reversed(names):
            if name in self._where:
                self._where.move_to_end(name)

    def _take(self, claimed: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        name, block = next(iter(self._where.items()))
        if block in claimed:
            return None
        del self._where[name]
        return block
