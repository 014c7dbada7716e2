"""The chain drafter of self-speculative decoding (SSD) on the engine: the shallow net (base layers 1..K + twig)
drafts γ tokens in a row, the full model verifies them.

`propose` runs the last accepted token and each draft through base layers 1..K once (their KV entries and
layer-K hidden states are kept) while the twig drafts; `verify` runs only base layers K+1..L over [last token,
drafts] in one pass on those saved states; `commit` crops every cache to the accepted prefix (`growth.commit_path`,
as every drafter keeps its path). The draft itself grows as a `growth.ChainGrowth`; the accept rule and the step
loop are every drafter's (`loop`).
"""

from __future__ import annotations

import torch

from ..config import GenConfig, SpecConfig
from ..engine import DecodeState, Engine
from ..errors import require_batch_one
from ..runtime.sampling import Sampler
from .growth import ChainGrowth, commit_path
from .loop import TreeDraft


class TwigChainDrafter:
    """The chain `Drafter` on the engine: base layers 1..K and the twig draft up to γ tokens in a row (stopping
    early below the confidence τ or at a stop token), base layers K+1..L verify them.

    Cache invariant between steps: every cache holds the prompt and the accepted tokens except the newest one
    (`last`), which the next `propose` feeds; the twig may lag one token behind (`_pending`), because the last
    draft of a step is run through layers 1..K for verification but never through the twig.
    """

    kind = "chain"

    def __init__(
        self,
        engine: Engine,
        state: DecodeState,
        cfg: GenConfig,
        generator: Sampler | None,
        threshold: float = SpecConfig.threshold,
    ) -> None:
        assert engine.twig is not None and state.twig_cache is not None
        require_batch_one(state.cache[0].keys().shape[0], "speculative decoding")
        self.engine, self.state, self.cfg, self.generator = engine, state, cfg, generator
        self.threshold = threshold
        self.ranks: list[int | None] = []  # rank visits for auto's record
        self.K = engine.twig.config.K
        self._pending: list[torch.Tensor] = []  # layer-K hidden states [1, 1, H] not yet in the twig cache
        self._growth = ChainGrowth(0, 0, threshold, set(), cfg, generator, 0)  # this step's [last, d_1..d_n]
        self._start = 0  # the position of `last`

    def _shallow_base(self, token: int) -> torch.Tensor:
        """Layers 1..K on one token (their caches grow by one): layer-K hidden state [1, 1, H]."""
        device = self.state.cache[0].keys().device
        hidden, pos = self.engine.embed_step(self.state, torch.tensor([[token]], device=device))
        return self.engine.forward(self.state, hidden, pos, 0, self.K)

    def _twig_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Twig on the pending states and `hidden`; logits [V] at `hidden`'s position."""
        block = torch.cat(self._pending + [hidden], dim=1)  # [1, n, H]
        end = self.state.next_position  # embed_step already advanced past `hidden`'s token
        pos = self.engine.adapter.text_positions(end - block.shape[1], block.shape[1])
        self._pending = []
        out = self.engine.forward_twig(self.state, block, pos)  # [1, n, H]
        rows = self.state.draft_head  # the draft vocabulary as it was when this generation started
        return self.engine.twig_logits(out[:, -1:], draft=rows is not None, rows=rows)[0, -1]  # [V]

    @torch.inference_mode()
    def propose(self, last: int, max_depth: int, stop_ids: set[int], index: int) -> TreeDraft:
        self._start = self.state.next_position
        growth = ChainGrowth(last, max_depth, self.threshold, stop_ids, self.cfg, self.generator, index)
        self._growth = growth
        nodes = growth.nodes
        nodes[0].hidden = self._shallow_base(last)
        more = max_depth > 0
        while more:  # the twig's next draft after the newest, which then runs through layers 1..K
            logits = self._twig_logits(nodes[-1].hidden)  # [V]
            (new,), more = growth.grow([len(nodes) - 1], logits.unsqueeze(0))
            nodes[new].hidden = self._shallow_base(nodes[new].token)
        return growth.draft()

    @torch.inference_mode()
    def verify(self, draft: TreeDraft) -> torch.Tensor:
        block = torch.cat([node.hidden for node in self._growth.nodes], dim=1)  # [1, n + 1, H]
        pos = self.engine.adapter.text_positions(self._start, block.shape[1])
        out = self.engine.forward(self.state, block, pos, self.K, self.engine.num_layers)
        return self.engine.logits(out)[0]  # [n + 1, V]

    def commit(self, path: list[int]) -> None:
        growth = self._growth
        self.ranks += growth.ranks(path)  # each accepted draft is rank 0; a rejection, None
        every = list(range(len(growth.nodes)))  # the order they ran through layers 1..K and are verified in
        fed = every[:-1]  # the twig saw last, d_1..d_{n-1}
        commit_path(self.state, growth, path, every, fed, self._pending, self._start, self.K)
