"""The prefix cache's index: chain names, longest cached run, least-recently-used eviction."""

from __future__ import annotations

import pytest

from metalserve.prefixcache import PrefixIndex


def test_names_chain_every_token_before_a_block() -> None:
    index = PrefixIndex(8, block_tokens=4)
    names = index.names(list(range(11)))
    assert len(names) == 2  # whole blocks only: tokens 8-10 are no block
    assert index.names(list(range(8))) == names
    # The same second block after a different first one is another block.
    other = index.names([99, 1, 2, 3, 4, 5, 6, 7])
    assert other[0] != names[0]
    assert other[1] != names[1]
    assert index.names([0, 1, 2]) == []


def test_match_gives_the_longest_cached_run() -> None:
    index = PrefixIndex(8, block_tokens=4)
    names = index.names(list(range(16)))  # four blocks
    assert index.match(names) == []
    claimed: set[int] = set()
    taken = index.claim(names[:3], claimed)
    assert [number for number, _ in taken] == [0, 1, 2]
    assert len(set(claimed)) == 3
    assert index.match(names) == [block for _, block in taken]  # three of four
    # Claiming again stores only what is missing.
    assert [number for number, _ in index.claim(names, set())] == [3]
    assert len(index) == 4


def test_eviction_drops_the_deepest_blocks_of_a_prefix_first() -> None:
    index = PrefixIndex(4, block_tokens=2)
    shared = index.names([1, 2, 3, 4, 5, 6])  # three blocks
    index.claim(shared, set())
    other = index.names([9, 9])
    index.match(shared)  # touched: deepest first, so its first block is the most recent
    taken = index.claim(other, set())  # the one free block
    assert len(taken) == 1
    taken = index.claim(index.names([8, 8]), set())  # evicts the least recent: shared's third
    assert len(taken) == 1
    assert len(index.match(shared)) == 2
    assert index.match(other) != []


def test_a_prefix_stored_once_keeps_its_first_blocks_longest() -> None:
    """Claimed and never matched since: others' blocks evict its deepest blocks first, so what
    is left of it is still a prefix that serves."""
    index = PrefixIndex(4, block_tokens=1)
    chat = index.names([1, 2, 3, 4])
    index.claim(chat, set())
    index.claim(index.names([8, 9]), set())
    assert len(index.match(chat)) == 2


def test_forgotten_blocks_are_free_again() -> None:
    index = PrefixIndex(2, block_tokens=1)
    claimed: set[int] = set()
    names = index.names([1, 2])
    index.claim(names, claimed)
    index.forget(claimed)  # e.g. their copy into the pool failed
    assert len(index) == 0
    assert index.match(names) == []
    assert len(index.claim(index.names([5, 6]), set())) == 2  # without evicting anything


def test_a_claim_never_evicts_what_this_prefill_claimed() -> None:
    index = PrefixIndex(2, block_tokens=1)
    claimed: set[int] = set()
    taken = index.claim(index.names([1, 2, 3]), claimed)
    assert [number for number, _ in taken] == [0, 1]  # the third does not fit
    assert len(index.claim(index.names([7]), claimed)) == 0
    # A later prefill may evict them.
    assert len(index.claim(index.names([7]), set())) == 1


def test_a_block_outlives_its_evicted_parent_and_serves_again_once_it_is_back() -> None:
    index = PrefixIndex(3, block_tokens=1)
    names = index.names([1, 2])
    index.claim(names, set())
    index.claim(index.names([5]), set())  # the last free block
    index.match(names[1:])  # an odd touch: the child is now newer than its parent
    index.claim(index.names([6]), set())  # evicts the parent
    assert index.match(names) == []
    assert [number for number, _ in index.claim(names, set())] == [0]
    assert len(index.match(names)) == 2


def test_refuses_an_empty_pool() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        PrefixIndex(0)
