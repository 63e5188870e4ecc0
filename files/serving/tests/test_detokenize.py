from __future__ import annotations

import itertools

from hypothesis import example, given, settings
from hypothesis import strategies as st

from metalserve.detokenize import IncrementalDetokenizer, StopMatcher
from metalserve.tiny_model import build_tokenizer

TOKENIZER = build_tokenizer()
BACKEND = TOKENIZER.backend_tokenizer


def stream(ids: list[int]) -> str:
    detok = IncrementalDetokenizer(BACKEND)
    return "".join(detok.push(t) for t in ids) + detok.flush()


def test_multibyte_characters_split_across_tokens() -> None:
    text = "naïve café 🙂 数字 done"
    ids = BACKEND.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split()), "byte-level tokens split the characters"
    detok = IncrementalDetokenizer(BACKEND)
    pieces = [detok.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces), "half characters are held back"
    assert "".join(pieces) + detok.flush() == text


@settings(max_examples=60, deadline=None, database=None)
@given(st.text(max_size=40))
def test_streamed_text_equals_decoded_text(text: str) -> None:
    ids = BACKEND.encode(text, add_special_tokens=False).ids
    assert stream(ids) == BACKEND.decode(ids)


def test_special_tokens_are_skipped() -> None:
    ids = [
        TOKENIZER.convert_tokens_to_ids("<|user|>"),
        *BACKEND.encode("Hi", add_special_tokens=False).ids,
    ]
    assert stream(ids) == "Hi"


def feed_all(stops: tuple[str, ...], deltas: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out, stopped = [], False
    for i, delta in enumerate(deltas):
        text, stopped = matcher.feed(delta, final=i == len(deltas) - 1)
        out.append(text)
        if stopped:
            break
    return "".join(out), stopped


def test_stop_string_split_across_deltas() -> None:
    assert feed_all(("END",), ["abc E", "N", "D tail"]) == ("abc ", True)
    assert feed_all(("END",), ["abc E", "N", "d tail"]) == ("abc ENd tail", False)


def test_held_back_text_is_not_released_early() -> None:
    matcher = StopMatcher(("xyz",))
    assert matcher.feed("abx") == ("ab", False)
    assert matcher.feed("y") == ("", False)
    assert matcher.feed("q") == ("xyq", False)


@settings(max_examples=200, deadline=None, database=None)
# Once found by the search: "a" completes first, "baa" began earlier and wins.
@example(text="bbaa", stops=["a", "baa"], cuts=[3])
@given(
    text=st.text(alphabet="abcx", max_size=30),
    stops=st.lists(st.text(alphabet="abcx", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=6),
)
def test_matches_cutting_the_whole_text(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)] or [""]
    positions = [text.find(s) for s in stops if s in text]
    expected = text[: min(positions)] if positions else text
    assert feed_all(tuple(stops), deltas) == (expected, bool(positions))
