"""Stopping a running pass between layers: `interruptible(event)` arms a stop signal for the calling thread, and
`check()` — which the engine calls before each layer — raises `Interrupted` once the event is set.

A prefill over a long prompt is one engine call that can take seconds; a generation that was cancelled (its
client left, its deadline passed, the server is shutting down) must not hold the model until it ends. The signal
is per thread, so a generation on one thread never stops another's, and `check()` costs one attribute read when
nothing is armed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_armed = threading.local()


class Interrupted(Exception):
    """A pass stopped at a layer boundary because its generation was cancelled."""


@contextlib.contextmanager
def interruptible(event: threading.Event) -> Iterator[None]:
    """Inside the block, `check()` on this thread raises `Interrupted` once `event` is set."""
    outer = getattr(_armed, "event", None)
    _armed.event = event
    try:
        yield
    finally:
        _armed.event = outer


def check() -> None:
    """Raise `Interrupted` if this thread's armed event is set (nothing when none is armed)."""
    event = getattr(_armed, "event", None)
    if event is not None and event.is_set():
        raise Interrupted
