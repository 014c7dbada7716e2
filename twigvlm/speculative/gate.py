"""Whether auto's next speculative step drafts at all: drafting stops for a while when it measures slower than plain
decoding would be, so an answer the twig drafts badly for (a picture unlike its training data, say) costs little
more than plain decoding.

auto picks its drafter once per generation, from the twig's acceptance so far (`choice`); a generation whose own
acceptance turns out far lower can then decode slower than without a twig (a step pays the draft, and gets little
for it). `DraftGate` watches the generation's speculative steps in windows of `window` steps and compares their
tokens per second with plain decoding's: measured, where it has run plain steps, else the cost model's
t_base(1) + t_verify(1) per token (an optimistic figure: the first switch needs the drafting rate below `margin`
of it). Slower, and the next `hold` steps draft nothing: a step of depth 0 verifies only the newest token, a
plain decode step through the same loop, so the text is what it would have been (every accept rule treats it as
a step with no drafts). Then a window drafts again: still slower than the plain steps just measured, and the hold
doubles (up to `max_hold`); faster, and drafting stays, the hold starting over.

Only auto's choices are gated: a drafter named in the request ("chain", "tree") drafts every step, as asked.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DraftGate:
    plain_s: float  # the cost model's seconds per plain token (t_base(1) + t_verify(1))
    window: int = 4  # speculative steps per measured window
    margin: float = 0.9  # the first switch: drafting below this share of the model's plain rate
    hold: int = 8  # plain steps after a losing window (doubling while drafting keeps losing)
    max_hold: int = 64
    off: int = 0  # plain steps still to run
    trial: bool = False  # the window after a hold: losing again doubles the hold
    plain_measured: float | None = None  # seconds per plain step, measured (the latest hold's mean)
    switches: int = 0  # how many times drafting was stopped (stats and tests read it)
    _hold: int = 0
    _steps: int = 0
    _tokens: int = 0
    _seconds: float = 0.0

    def depth(self, depth: int) -> int:
        """The next step's draft depth: `depth`, or 0 while drafting is off."""
        return 0 if self.off > 0 else depth

    def record(self, tokens: int, seconds: float, drafted: bool) -> bool:
        """A step that emitted `tokens` in `seconds`; `drafted`: whether it was allowed to draft. Returns whether
        it was one of the gate's plain steps (a caller counts them in `SpecStats.undrafted`)."""
        self._steps, self._tokens, self._seconds = self._steps + 1, self._tokens + tokens, self._seconds + seconds
        if not drafted:
            paused = self.off > 0
            if paused:
                self.off -= 1
                if self.off == 0:  # the hold is over: its mean step, and a trial window of drafting next
                    self.plain_measured, self.trial = self._seconds / self._steps, True
                    self._reset()
            else:
                self._reset()  # (a last step kept short by the answer's length: not a measurement)
            return paused
        if self._steps < self.window:
            return False
        rate = self._tokens / max(self._seconds, 1e-9)
        plain = 1.0 / self.plain_measured if self.plain_measured else self.margin / max(self.plain_s, 1e-9)
        self._reset()
        if rate < plain:
            self._hold = min(2 * self._hold, self.max_hold) if self.trial and self._hold else self.hold
            self.off, self.trial = self._hold, False
            self.switches += 1
        elif self.trial:
            self.trial, self._hold = False, 0
        return False

    def _reset(self) -> None:
        self._steps, self._tokens, self._seconds = 0, 0, 0.0
