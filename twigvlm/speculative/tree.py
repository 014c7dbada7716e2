"""The engine's tree drafter: the shallow net grows an EAGLE-2-style dynamic tree, the deep layers verify it.

Drafting (`propose`): the root (the newest accepted token) runs through base layers 1..K and the twig; level by
level the tree grows (`growth.TreeGrowth`: the top-k children of the best candidates, scored by their path's
log-probability under the twig), each level's expanded nodes running through layers 1..K and the twig in one pass,
with a tree attention mask (each sees the committed prefix and its own path) and positions = the root's position
+ depth. The kept nodes that were never expanded run through layers 1..K in one more pass, so every node has its
layer-K state.

Verification (`verify`) runs only base layers K+1..L over all N + 1 nodes in one pass on those states, with the
tree mask. `commit` keeps the committed prefix plus the accepted path, in order, in every cache — layers 1..K
(root, expanded nodes, the extra pass), the twig (root and expanded nodes), and the deep layers (the tree in
verification order) — a `gather_tail`, each cache with its own length (`growth.commit_path`). The accepted path's
last node may never have been through the twig: its layer-K state waits in `_pending`, as in the chain drafter.
"""

from __future__ import annotations

import torch

from ..config import GenConfig
from ..engine import DecodeState, Engine
from ..errors import require_batch_one
from ..runtime.sampling import Sampler
from .growth import TreeGrowth, commit_path
from .loop import TreeDraft


class TwigTreeDrafter:
    """The tree `Drafter` on the engine: base layers 1..K and the twig draft a tree, base layers K+1..L verify it.

    Cache invariant between steps (as `TwigChainDrafter`'s): every cache holds the prompt and the accepted tokens
    except the newest one, which the next `propose` feeds; the twig may lag behind by the states in `_pending`.
    """

    kind = "tree"

    def __init__(
        self,
        engine: Engine,
        state: DecodeState,
        cfg: GenConfig,
        topk: int,
        nodes: int,
        generator: Sampler | None = None,
    ) -> None:
        assert engine.twig is not None and state.twig_cache is not None
        require_batch_one(state.cache[0].keys().shape[0], "speculative decoding")
        self.engine, self.state, self.cfg, self.topk, self.nodes = engine, state, cfg, topk, nodes
        self.generator = generator  # positional sampling's noise perturbs the twig's scores (a generator: unused)
        self.ranks: list[int | None] = []  # at each reached node with children: the accepted child's rank, or None
        self.K = engine.twig.config.K
        self._pending: list[torch.Tensor] = []  # layer-K states [1, 1, H] not yet in the twig cache
        self._growth = TreeGrowth(0, topk, nodes, 0, set(), cfg, generator, 0)
        self._kslots: list[int] = []  # the node in each entry of the layers-1..K caches' tail this step
        self._tslots: list[int] = []  # the node in each entry of the twig caches' tail this step
        self._start = 0  # the root's position

    # ---- drafting -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, last: int, max_depth: int, stop_ids: set[int], index: int) -> TreeDraft:
        self._start = self.state.next_position
        growth = TreeGrowth(last, self.topk, self.nodes, max_depth, stop_ids, self.cfg, self.generator, index)
        self._growth = growth
        self._kslots, self._tslots = [], []
        self._run_base([0])
        if max_depth > 0:
            frontier, logits = [0], self._run_twig([0])
            while True:
                frontier, more = growth.grow(frontier, logits)
                if not more:
                    break
                self._run_base(frontier)
                logits = self._run_twig(frontier)
        draft = growth.draft()
        missing = growth.missing()
        if missing:
            self._run_base(missing)
        return draft

    def _tail(self, queries: list[int], slots: list[int]) -> torch.Tensor | None:
        """The tree mask [q, m] of `queries` over the nodes in a cache's tail (`slots`): True on their own path.
        None for the root alone (plain one-token attention, as a decode step)."""
        if queries == [0]:
            return None
        return torch.tensor(self._growth.mask(queries, slots), dtype=torch.bool, device=self.engine.adapter.device)

    def _positions(self, ids: list[int]) -> torch.Tensor:
        return self.engine.adapter.positions_at(self._growth.positions(self._start, ids))

    def _run_base(self, ids: list[int]) -> None:
        """Nodes `ids` through base layers 1..K in one pass (their caches grow by len(ids)); keeps their states."""
        device = self.engine.adapter.device
        nodes = self._growth.nodes
        tokens = torch.tensor([[nodes[i].token for i in ids]], device=device)  # [1, n]
        self._kslots += ids
        hidden = self.engine.forward(
            self.state,
            self.engine.adapter.embed(tokens),
            self._positions(ids),
            0,
            self.K,
            tail=self._tail(ids, self._kslots),
        )  # [1, n, H]
        for j, i in enumerate(ids):
            nodes[i].hidden = hidden[:, j : j + 1]

    def _run_twig(self, ids: list[int]) -> torch.Tensor:
        """Nodes `ids` (the root: after the pending states) through the twig; the twig's logits [n, V] for the
        token after each."""
        hidden = torch.cat([self._growth.nodes[i].hidden for i in ids], dim=1)  # [1, n, H]
        self._tslots += ids
        if ids == [0]:
            block = torch.cat(self._pending + [hidden], dim=1)  # [1, p + 1, H]
            pos = self.engine.adapter.text_positions(self._start - len(self._pending), block.shape[1])
            self._pending = []
            out = self.engine.forward_twig(self.state, block, pos)[:, -1:]  # causal: the pending states are prefix
        else:
            out = self.engine.forward_twig(self.state, hidden, self._positions(ids), self._tail(ids, self._tslots))
        rows = self.state.draft_head
        return self.engine.twig_logits(out, draft=rows is not None, rows=rows)[0]  # [n, V]

    # ---- verification and commit --------------------------------------------------------------------------------
    @torch.inference_mode()
    def verify(self, tree: TreeDraft) -> torch.Tensor:
        order = self._growth.order
        block = torch.cat([self._growth.nodes[i].hidden for i in order], dim=1)  # [1, N + 1, H]
        tail = tree.ancestry().to(block.device) if tree.size else None
        out = self.engine.forward(self.state, block, self._positions(order), self.K, self.engine.num_layers, tail=tail)
        return self.engine.logits(out)[0]  # [N + 1, V]

    @torch.inference_mode()
    def commit(self, path: list[int]) -> None:
        self.ranks += self._growth.ranks(path)
        commit_path(self.state, self._growth, path, self._kslots, self._tslots, self._pending, self._start, self.K)
