"""`MemoryBudget`: the bytes that all requests may hold at once — bodies while they are read and parsed, pictures
once decoded — so that no mix of clients can make the server's memory grow without bound (`--max-buffered-mb`).

Each request takes its share through a `Hold` and gives it all back when it ends, whatever the outcome. A share
that does not fit right now is a 503 with Retry-After (the server is busy, not the request wrong): a request that
could never fit is refused earlier by the per-request limits, which `ServeConfig.validate` keeps below the budget.
"""

from __future__ import annotations

import threading

from .errors import APIError

RETRY_AFTER_S = 1


class MemoryBudget:
    """A counter of bytes in use against a limit; thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Reserve n bytes if they fit; False (nothing reserved) when they do not."""
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n

    def hold(self) -> Hold:
        return Hold(self)


class Hold:
    """One request's share of the budget."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.bytes = 0
        self.closed = False  # released: the request is over, and takes nothing more
        self._lock = threading.Lock()

    def take(self, n: int, what: str) -> None:
        """Reserve n more bytes for `what` (words for the error), or raise a 503 with Retry-After. A released
        hold takes nothing more (a picture still being read in a pool thread for a request that has ended)."""
        with self._lock:
            if self.closed:
                raise APIError(499, "the request ended while its data was still being read", code="cancelled")
            if not self.budget.take(n):
                raise APIError(
                    503,
                    f"the server holds too much request data right now to take {what} (--max-buffered-mb "
                    f"{self.budget.limit // 2**20}): retry later",
                    code="server_busy",
                    retry_after=RETRY_AFTER_S,
                )
            self.bytes += n

    def give(self, n: int) -> None:
        """Give back n of this request's bytes (for example its body, once parsed and dropped)."""
        with self._lock:
            n = min(n, self.bytes)
            self.bytes -= n
        self.budget.give(n)

    def release(self) -> None:
        """Give back everything this request holds, and take nothing more (safe to call more than once)."""
        with self._lock:
            self.closed = True
        self.give(self.bytes)
