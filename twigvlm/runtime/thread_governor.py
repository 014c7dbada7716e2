"""How many threads the native decoder layers run on: all of torch's, or fewer while another process takes cores.

The native layers' threads meet at about nine barriers a layer. On idle cores that costs microseconds; when another
process holds a core, every barrier waits for whichever thread lost its turn, and on a 2-core machine beside one
busy process a decode step on two threads takes half again as long as on one (SSD 48–56 ms a token against 25).
The scheduler says when it happens: a thread's *involuntary* context switches (its core given to another runnable
thread; `csrc/layer.c` reports each call's, summed over its threads) are under one per call of 30 layers on idle
cores and 50–100 a call beside a busy process. Linux counts them per thread; elsewhere the count is 0 and the team
stays as asked.

`ThreadGovernor` reads that count after every call and, over windows of `window_s` seconds of calls, compares the
rate with `limit` preemptions per millisecond:

- above it, the team halves (down to one thread) and stays there for `hold_s`;
- then the full team is tried again for one window: still contended, it halves again and the hold doubles (up to
  `max_hold_s`); calm, it stays full and the hold starts over.

So on idle cores nothing changes (the rate never nears the limit), a busy machine costs one window of slow calls
per hold, a load that arrives is followed within a window and one that ends within the hold (at most 2 s). The
rate is the team's, not a thread's: each preemption stalls the whole team at its next barrier. Its limit was set
on 2 cores (idle 0.03, busy 1 or more); a host of many cores may want its own. Results do not depend on the team's size
(each output of a product, a norm or an attention head is computed by one thread, whatever their number).
`TWIGVLM_ADAPTIVE_THREADS=0` keeps the full team (for measurements that want it fixed).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ThreadGovernor:
    window_s: float = 0.02  # seconds of calls per measured window
    limit: float = 0.25  # preemptions per millisecond of calls above which the team halves
    hold_s: float = 0.5  # how long a reduced team stays before the full one is tried again (doubling)
    max_hold_s: float = 2.0  # (a load that ends costs at most this long on the reduced team)
    clock: Callable[[], float] = time.monotonic
    enabled: bool = field(default_factory=lambda: os.environ.get("TWIGVLM_ADAPTIVE_THREADS", "1") != "0")
    full: int = 0  # the team asked for (torch's threads); 0 before the first call
    current: int = 0  # the team the next call runs on
    hold: float = 0.0  # the current hold (0: the next reduction starts from hold_s)
    retry_at: float = 0.0  # when a reduced team tries the full one again
    trial: bool = False  # the full team is back on trial (a contended window halves it with a doubled hold)
    reductions: int = 0  # how many times the team was halved (a measurement taken meanwhile saw a busy machine)
    _spent: float = 0.0  # the window so far: seconds in calls and preemptions in them
    _preempted: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def threads(self, full: int) -> int:
        """The team for the next call, when `full` threads are asked for."""
        if not self.enabled or full <= 1:
            return max(1, full)
        with self._lock:
            if full != self.full:  # (a new thread count: start over)
                self.full, self.current, self.hold, self.trial = full, full, 0.0, False
                self._reset_window()
            elif self.current < full and self.clock() >= self.retry_at:
                self.current, self.trial = full, True
                self._reset_window()
            return self.current

    def record(self, seconds: float, preempted: int) -> None:
        """A call that took `seconds` and in which the team was preempted `preempted` times."""
        if not self.enabled or self.full <= 1:
            return
        with self._lock:
            self._spent += seconds
            self._preempted += preempted
            if self._spent < self.window_s:
                return
            rate = self._preempted / (self._spent * 1e3)
            self._reset_window()
            if rate > self.limit and self.current > 1:
                if self.trial:  # the full team, tried again, is still contended: wait longer next time
                    self.hold = min(2 * self.hold, self.max_hold_s)
                self.hold = self.hold or self.hold_s
                self.current, self.trial = max(1, self.current // 2), False
                self.reductions += 1
                self.retry_at = self.clock() + self.hold
            elif rate <= self.limit and self.current == self.full:
                self.trial, self.hold = False, 0.0

    def calm(self) -> bool:
        """Whether the team is as asked (or nothing has run yet): no contention seen lately."""
        return not self.enabled or self.current == self.full

    def _reset_window(self) -> None:
        self._spent, self._preempted = 0.0, 0


GOVERNOR = ThreadGovernor()  # one per process: contention is the machine's, whatever engine runs the layers
