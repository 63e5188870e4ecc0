"""Streaming detokenization and stop-string handling for one sequence."""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time.

    Byte-level tokens may end in the middle of a UTF-8 character; decoding those gives U+FFFD. The
    text of a short window of recent tokens is held back until it decodes cleanly (the approach of
    TGI and vLLM), so each step costs a few tokens of decoding, not the whole sequence. ``flush``
    releases whatever is still held back when the sequence ends. The result depends only on the
    token ids, so streamed and non-streamed responses always carry the same text.
    """

    def __init__(self, decoder: _Decoder) -> None:
        self._decoder = decoder
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text, new_text = self._window()
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        prefix_text, new_text = self._window()
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""

    def _window(self) -> tuple[str, str]:
        ids = self._ids
        prefix_text = self._decoder.decode(
            ids[self._prefix_offset : self._read_offset], skip_special_tokens=True
        )
        new_text = self._decoder.decode(ids[self._prefix_offset :], skip_special_tokens=True)
        return prefix_text, new_text


class StopMatcher:
    """Cuts the text at the first stop string; never releases text that may begin one.

    A stop that completes is final only once no stop starting earlier can still complete: with
    stops "a" and "baa", the text "bba" waits, since "baa" may begin at its "b" (OpenAI cuts at
    the earliest occurrence in the whole text).
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self._sent = 0

    def feed(self, delta: str, *, final: bool = False) -> tuple[str, bool]:
        """Add text; return (text that is safe to send now, whether a stop string matched)."""
        self.text += delta
        hit = self._first_stop()
        pending = None if final else self._first_partial(len(self.text) if hit is None else hit)
        if hit is not None and pending is None:
            self.text = self.text[:hit]
            return self._release(hit), True
        return self._release(len(self.text) if pending is None else pending), False

    def _first_stop(self) -> int | None:
        # A match cannot start inside sent text: any prefix of it would have been held back.
        positions = [i for s in self._stops if (i := self.text.find(s, self._sent)) >= 0]
        return min(positions) if positions else None

    def _first_partial(self, before: int) -> int | None:
        """The first unsent position before ``before`` where a stop may begin but has not ended."""
        start = max(self._sent, len(self.text) - self._longest + 1)
        for position in range(start, before):
            rest = self.text[position:]
            if any(len(rest) < len(stop) and stop.startswith(rest) for stop in self._stops):
                return position
        return None

    def _release(self, upto: int) -> str:
        out = self.text[self._sent : upto]
        self._sent = max(self._sent, upto)
        return out
