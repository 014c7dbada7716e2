"""One request of a batch (`Row`): its inputs, decoding state, stopping rules, drafting and what it has produced —
what the batch's steps (`batch.py`, `batch_draft.py`) read and advance."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapters.base import Encoded
from ..config import GenConfig, PruneConfig, SpecConfig
from ..engine import DecodeState
from ..pruning.prefill import PruneStats
from ..runtime.sampling import Sampler
from ..speculative.chain import TwigChainDrafter
from ..speculative.choice import DrafterChoice
from ..speculative.gate import DraftGate
from ..speculative.stats import SpecStats
from ..speculative.tree import TwigTreeDrafter
from .loop import take_token
from .stream import TextStream


@dataclass
class Row:
    """One request of a batch: its inputs, state, stopping rules, drafting and what it has produced."""

    encoded: Encoded
    cfg: GenConfig
    prune: PruneConfig | None
    spec: SpecConfig | None = None
    state: DecodeState | None = None
    ids: list[int] = field(default_factory=list)
    next_token: int = 0
    reason: str | None = None
    pruned: PruneStats | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    text: TextStream | None = None
    generator: Sampler | None = None  # a sampled request's randomness
    eos: set[int] = field(default_factory=set)
    stop_ids: set[int] = field(default_factory=set)
    pieces: list[str] = field(default_factory=list)  # text not yet handed on (a server streams and clears it)
    choice: DrafterChoice | None = None  # its drafter (speculative rows that draft), else None
    spec_stats: SpecStats | None = None
    depth: int = 0  # the draft depth it asks for (a chain's γ, adaptive where asked; a tree's D)
    cap: int | None = None  # an adaptive γ's cap (`choice.draft_depth`), None where the depth stays
    gate: DraftGate | None = None  # auto's, for its steps alone (`speculative.gate`); None for a named drafter
    pending: list[torch.Tensor] = field(default_factory=list)  # layer-K states [1, 1, H] its twig has not seen
    ranks: list[int | None] = field(default_factory=list)  # for the twig's acceptance record (`DraftRecord`)
    solo: TwigChainDrafter | TwigTreeDrafter | None = None  # its own drafter while it is alone in the batch
    solo_tokens: int = 0  # tokens its own drafter's steps produced, and their seconds (auto's calibration)
    solo_s: float = 0.0

    def take(self, token: int) -> None:
        """Add a token under the stopping rules (`loop.take_token`); new text goes to `pieces`."""
        assert self.text is not None
        piece, self.reason = take_token(token, self.ids, self.text, self.cfg.max_new_tokens, self.eos, self.stop_ids)
        if piece:
            self.pieces.append(piece)
        self.next_token = token

    def take_block(self, tokens: list[int]) -> None:
        """Take a step's tokens in order until one ends the row (the rest are dropped, as `loop.emit` does)."""
        for token in tokens:
            self.take(token)
            if self.reason is not None:
                return

    @property
    def left(self) -> int:
        """The most drafts its answer leaves room for (a step emits the drafts it accepts and one more token)."""
        return max(0, self.cfg.max_new_tokens - len(self.ids) - 1)

    @property
    def budget(self) -> int:
        """The most drafts its next step may make: its depth, within what is left of its answer."""
        return min(self.depth, self.left) if self.choice else 0
