"""The engine's tree drafter: the shallow net grows an EAGLE-2-style dynamic tree, the deep layers verify it.

Drafting (`propose`): the root (the newest accepted token) runs through base layers 1..K and the twig. Level by
level, the top-k children of every expanded node become candidates, scored by the cumulative log-probability
of their path under the twig; the k best candidates of a level are expanded next (those that can still have
a descendant among the best N: drafting stops early when none can): they run through layers 1..K and the twig
in one pass, with a tree attention mask (each sees the committed prefix and its own path) and
positions = the root's position + depth. At the end the best N candidates of all levels form the tree (a child
never outranks its parent, so they always do); the chosen nodes that were never expanded run through layers
1..K in one more pass, so every node has its layer-K state.

Verification (`verify`) runs only base layers K+1..L over all N + 1 nodes in one pass on those states, with the
tree mask. `commit` keeps the committed prefix plus the accepted path, in order, in every cache — layers 1..K
(root, expanded nodes, the extra pass), the twig (root and expanded nodes), and the deep layers (the tree in
verification order) — a `gather_tail`, each cache with its own length. The accepted path's last node may never
have been through the twig: its layer-K state waits in `_pending`, as in the chain drafter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GenConfig
from ..engine import DecodeState, Engine
from ..errors import require_batch_one
from ..runtime.sampling import probs_from_logits
from .loop import TreeDraft


@dataclass
class _Node:
    token: int
    parent: int  # index in the step's node list; -1 for the root
    depth: int
    score: float  # log-probability of the path root → node under the twig
    hidden: torch.Tensor | None = None  # layer-K state [1, 1, H], once run through layers 1..K


class TwigTreeDrafter:
    """The tree `Drafter` on the engine: base layers 1..K and the twig draft a tree, base layers K+1..L verify it.

    Cache invariant between steps (as `TwigChainDrafter`'s): every cache holds the prompt and the accepted tokens
    except the newest one, which the next `propose` feeds; the twig may lag behind by the states in `_pending`.
    """

    def __init__(
        self,
        engine: Engine,
        state: DecodeState,
        cfg: GenConfig,
        topk: int,
        nodes: int,
    ) -> None:
        assert engine.twig is not None and state.twig_cache is not None
        require_batch_one(state.cache[0].keys().shape[0], "speculative decoding")
        self.engine, self.state, self.cfg, self.topk, self.nodes = engine, state, cfg, topk, nodes
        self.ranks: list[int | None] = []  # at each reached node with children: the accepted child's rank, or None
        self.K = engine.twig.config.K
        self._pending: list[torch.Tensor] = []  # layer-K states [1, 1, H] not yet in the twig cache
        self._nodes: list[_Node] = []
        self._kslots: list[int] = []  # the node in each entry of the layers-1..K caches' tail this step
        self._tslots: list[int] = []  # the node in each entry of the twig caches' tail this step
        self._order: list[int] = []  # the tree's nodes in verification order (the root first)
        self._start = 0  # the root's position

    # ---- drafting -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, last: int, max_depth: int, stop_ids: set[int]) -> TreeDraft:
        self._start = self.state.next_position
        self._nodes, self._kslots, self._tslots = [_Node(last, -1, 0, 0.0)], [], []
        self._run_base([0])
        if max_depth > 0:
            frontier, logp = [0], self._run_twig([0])  # logp [1, V]
            for level in range(1, max_depth + 1):
                new = self._expand(frontier, logp)
                live = [i for i in new if self._nodes[i].token not in stop_ids]  # nothing follows a stop token
                frontier = [i for i in live if self._nodes[i].score > self._nth_best()]  # else no child is kept
                frontier = sorted(frontier, key=lambda i: -self._nodes[i].score)[: self.topk]
                if level == max_depth or not frontier:
                    break
                self._run_base(frontier)
                logp = self._run_twig(frontier)
        self._order = self._select()
        missing = [i for i in self._order if self._nodes[i].hidden is None]
        if missing:
            self._run_base(missing)
        where = {node: j for j, node in enumerate(self._order)}
        parents = [-1] + [where[self._nodes[i].parent] for i in self._order[1:]]
        return TreeDraft([self._nodes[i].token for i in self._order], parents)

    def _expand(self, parents: list[int], logp: torch.Tensor) -> list[int]:
        """Add the top-k children of each parent (logp [len(parents), V]) as candidates; their node indices."""
        vals, ids = logp.topk(min(self.topk, logp.shape[-1]), dim=-1)  # [n, k]
        new = []
        for parent, row_vals, row_ids in zip(parents, vals.tolist(), ids.tolist(), strict=True):
            p = self._nodes[parent]
            for v, t in zip(row_vals, row_ids, strict=True):
                if v != float("-inf"):  # outside the draft vocabulary or the sampling filters
                    new.append(len(self._nodes))
                    self._nodes.append(_Node(t, parent, p.depth + 1, p.score + v))
        return new

    def _nth_best(self) -> float:
        """The N-th best candidate score so far (−inf with fewer): a node scoring no more than it can have no
        descendant among the best N (a child never outscores its parent, and ties keep the shallower)."""
        if len(self._nodes) - 1 < self.nodes:
            return float("-inf")
        return sorted((n.score for n in self._nodes[1:]), reverse=True)[self.nodes - 1]

    def _select(self) -> list[int]:
        """The root and the best N candidates, ordered by depth (a parent before its children), siblings best
        first. Ties put the shallower node first, so a child is never kept without its parent."""
        ranked = sorted(range(1, len(self._nodes)), key=lambda i: (-self._nodes[i].score, self._nodes[i].depth, i))
        chosen = set(ranked[: self.nodes])
        assert all(self._nodes[i].parent in chosen or self._nodes[i].parent == 0 for i in chosen), "not a tree"
        return [0] + sorted(chosen, key=lambda i: (self._nodes[i].depth, -self._nodes[i].score, i))

    def _tail(self, queries: list[int], slots: list[int]) -> torch.Tensor | None:
        """The tree mask [q, m] of `queries` over the nodes in a cache's tail (`slots`): True on their own path.
        None for the root alone (plain one-token attention, as a decode step)."""
        if queries == [0]:
            return None
        rows = []
        for i in queries:
            path = set()
            while i >= 0:
                path.add(i)
                i = self._nodes[i].parent
            rows.append([s in path for s in slots])
        return torch.tensor(rows, dtype=torch.bool, device=self.engine.adapter.device)

    def _positions(self, ids: list[int]) -> torch.Tensor:
        return self.engine.adapter.positions_at([self._start + self._nodes[i].depth for i in ids])

    def _run_base(self, ids: list[int]) -> None:
        """Nodes `ids` through base layers 1..K in one pass (their caches grow by len(ids)); keeps their states."""
        device = self.engine.adapter.device
        tokens = torch.tensor([[self._nodes[i].token for i in ids]], device=device)  # [1, n]
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
            self._nodes[i].hidden = hidden[:, j : j + 1]

    def _run_twig(self, ids: list[int]) -> torch.Tensor:
        """Nodes `ids` (the root: after the pending states) through the twig; log-probabilities [n, V] of the
        token after each, under the twig (in sampling, of the filtered distribution: any fixed choice of drafts
        is lossless)."""
        hidden = torch.cat([self._nodes[i].hidden for i in ids], dim=1)  # [1, n, H]
        self._tslots += ids
        if ids == [0]:
            block = torch.cat(self._pending + [hidden], dim=1)  # [1, p + 1, H]
            pos = self.engine.adapter.text_positions(self._start - len(self._pending), block.shape[1])
            self._pending = []
            out = self.engine.forward_twig(self.state, block, pos)[:, -1:]  # causal: the pending states are prefix
        else:
            out = self.engine.forward_twig(self.state, hidden, self._positions(ids), self._tail(ids, self._tslots))
        rows = self.state.draft_head
        logits = self.engine.twig_logits(out, draft=rows is not None, rows=rows)[0]  # [n, V]
        if self.cfg.do_sample:
            return probs_from_logits(logits, self.cfg).log()
        return logits.float().log_softmax(dim=-1)

    # ---- verification and commit --------------------------------------------------------------------------------
    @torch.inference_mode()
    def verify(self, tree: TreeDraft) -> torch.Tensor:
        block = torch.cat([self._nodes[i].hidden for i in self._order], dim=1)  # [1, N + 1, H]
        tail = tree.ancestry().to(block.device) if tree.size else None
        out = self.engine.forward(
            self.state, block, self._positions(self._order), self.K, self.engine.num_layers, tail=tail
        )
        return self.engine.logits(out)[0]  # [N + 1, V]

    @torch.inference_mode()
    def commit(self, path: list[int]) -> None:
        nodes = [self._order[i] for i in path]  # the accepted path as this step's node indices
        self._record_ranks(path)
        deep = range(self.K, self.engine.num_layers)
        self.state.cache.gather_tail(len(self._order), path, deep)
        kpos = {node: j for j, node in enumerate(self._kslots)}
        self.state.cache.gather_tail(len(self._kslots), [kpos[i] for i in nodes], range(self.K))
        tpos = {node: j for j, node in enumerate(self._tslots)}
        fed = [i for i in nodes if i in tpos]
        assert nodes[: len(fed)] == fed, "only the path's last node may have skipped the twig"
        if self._tslots:
            self.state.twig_cache.gather_tail(len(self._tslots), [tpos[i] for i in fed])
        self._pending += [self._nodes[i].hidden for i in nodes[len(fed) :]]
        self.state.next_position = self._start + len(path)

    def _record_ranks(self, path: list[int]) -> None:
        """Which of its children (by rank) the target took at each node of the path that has children."""
        children: dict[int, list[int]] = {}
        for j, i in enumerate(self._order[1:], start=1):
            children.setdefault(self._order.index(self._nodes[i].parent), []).append(j)
        for node, nxt in zip(path, path[1:] + [None], strict=True):
            if node in children:
                self.ranks.append(None if nxt is None else children[node].index(nxt))
