"""Streaming text: incremental detokenization that releases a piece only when it can never change, and holds
back what might be the start of a stop string."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """Incremental detokenization that never emits text it might have to take back.

    Pieces are released only when they are complete characters and cannot be the start of a stop string.
    The concatenation of all pieces is the final text, cut before the first stop string.

    Each token costs one decode of a bounded window — the ids not yet settled, after CONTEXT settled ones (so a
    token's leading space comes out as it does in context) — and one of the next context when they settle. Ids
    settle once their text ends in a complete character; like a decode of every id, this relies on
    decode(ids[:n]) being a prefix of decode(ids[:n + 1]) (a window that breaks it falls back to a full decode).
    """

    CONTEXT = 8  # settled ids decoded before the new ones

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._margin = max((len(s) for s in self._stop), default=0)  # released text a stop string may still span
        self._ids: list[int] = []
        self._settled = 0  # ids[:settled] have their final text
        self._head = ""  # decode of the CONTEXT ids before `_settled`
        self._buf = ""  # the settled text from offset `_buf_at` on (a stop string's margin + what is unreleased)
        self._buf_at = 0
        self._released = 0  # characters released so far
        self._pieces: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._pieces)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly releasable text ('' if none)."""
        self._ids.append(token_id)
        tail = self._unsettled()
        complete = tail.rstrip("\ufffd")  # an incomplete multi-byte character waits
        window = self._buf + complete  # the text from offset _buf_at on
        cut = self._find_stop(window)
        if cut is not None:
            self.stopped = True
            return self._release(window, cut)
        piece = self._release(window, len(window) - self._held_back(window))
        if len(complete) == len(tail):
            self._settle(tail)
        return piece

    def finish(self) -> str:
        """Release whatever is still held back (the generation ended without a stop string)."""
        if self.stopped:
            return ""
        window = self._buf + self._unsettled()
        return self._release(window, len(window))

    def _unsettled(self) -> str:
        """The text of ids[settled:], decoded after up to CONTEXT settled ids."""
        context = self._ids[max(0, self._settled - self.CONTEXT) : self._settled]
        whole = self._decode(context + self._ids[self._settled :])
        if whole.startswith(self._head):
            return whole[len(self._head) :]
        return self._decode(self._ids)[self._buf_at + len(self._buf) :]  # the context's text changed: rare

    def _settle(self, tail: str) -> None:
        """ids so far have their final text: move the window past them, keep only the text still needed."""
        self._buf += tail
        self._settled = len(self._ids)
        self._head = self._decode(self._ids[max(0, self._settled - self.CONTEXT) :])
        drop = self._released - self._margin - self._buf_at
        if drop > 0:
            self._buf, self._buf_at = self._buf[drop:], self._buf_at + drop

    def _release(self, window: str, upto: int) -> str:
        """Release the window's text up to `upto` (relative to _buf_at) that was not released yet."""
        piece = window[self._released - self._buf_at : upto]
        self._released += len(piece)
        if piece:
            self._pieces.append(piece)
        return piece

    def _find_stop(self, window: str) -> int | None:
        start = max(0, self._released - self._margin - self._buf_at)
        hits = [i for i in (window.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, window: str) -> int:
        """Length of the longest suffix of `window` that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(window)), best, -1):
                if window.endswith(s[:n]):
                    best = n
                    break
        return best
