"""One step's draft as the twig grows it, whoever runs the passes: the nodes, which to run next, the draft the full
model verifies, and how the accepted path is kept in the caches.

A growth starts from the root (the newest accepted token) and is fed the twig's logits at the nodes it asked for;
it answers which nodes go through base layers 1..K next and whether the twig reads them after (`grow`):

- `TreeGrowth`, EAGLE-2's dynamic tree: the top-k children of every expanded node become candidates, scored by
  the cumulative log-probability of their path under the twig; the k best candidates of a level are expanded next
  (those that can still have a descendant among the best N: drafting stops early when none can). At the end the
  best N candidates of all levels form the tree (a child never outranks its parent, so they always do); the kept
  nodes that were never expanded go through layers 1..K once more (`missing`), so every node has its state.
- `ChainGrowth`, γ tokens in a row: the twig's best token (or one sampled from its distribution q, kept for
  speculative sampling) after the newest draft, until γ, a stop token, or a confidence below τ. Its last draft goes
  through layers 1..K for verification but never through the twig.

The solo drafters run one growth on their own caches (`tree.TwigTreeDrafter` a `TreeGrowth`,
`chain.TwigChainDrafter` a `ChainGrowth`); a batch step (`generation/batch_draft.py`) runs one growth per drafting
row in shared passes. Each keeps the path with `commit_path`, and trees build attention masks from `Growth.mask`
(a node sees its own path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GenConfig
from ..engine import DecodeState
from ..runtime.sampling import PositionalNoise, Sampler, probs_from_logits, tempered_logits
from .loop import TreeDraft


@dataclass
class Node:
    token: int
    parent: int  # index in the step's node list; -1 for the root
    depth: int
    score: float  # log-probability of the path root → node under the twig (a chain's: 0)
    hidden: torch.Tensor | None = None  # layer-K state [1, 1, H], once run through layers 1..K


class Growth:
    """What every growth has: its nodes (the root first), the order the full model verifies them in once drafting
    is over (`draft`), and the masks and rank records read from the tree's shape."""

    def __init__(self, root: int) -> None:
        self.nodes = [Node(root, -1, 0, 0.0)]
        self.order: list[int] = [0]  # node indices in verification order (the root first), set by `draft`

    def grow(self, parents: list[int], logits: torch.Tensor) -> tuple[list[int], bool]:
        """Feed the twig's logits [len(parents), V] at `parents` (the nodes it read last): (the nodes to run through
        layers 1..K next, whether the twig reads them after — drafting goes on). Here: nothing (no drafts)."""
        return [], False

    def draft(self) -> TreeDraft:
        """The finished draft, its nodes in verification order (`order`): here the root alone (a row that drafts
        nothing this step)."""
        self.order = [0]
        return TreeDraft([self.nodes[0].token], [-1])

    def missing(self) -> list[int]:
        """Nodes of the draft that never went through layers 1..K."""
        return [i for i in self.order if self.nodes[i].hidden is None]

    def mask(self, queries: list[int], slots: list[int]) -> list[list[bool]]:
        """Per query node, over the nodes `slots` (a cache's entries this step, in order): True on its own path."""
        out = []
        for i in queries:
            path = set()
            while i >= 0:
                path.add(i)
                i = self.nodes[i].parent
            out.append([s in path for s in slots])
        return out

    def positions(self, start: int, ids: list[int]) -> list[int]:
        """Each node's position: the root's plus its depth (siblings share one)."""
        return [start + self.nodes[i].depth for i in ids]

    def ranks(self, path: list[int]) -> list[int | None]:
        """Which of its children (by rank) the target took at each node of the accepted path (indices into
        `order`) that has children: None where it took none (a chain's drafts are all rank 0)."""
        children: dict[int, list[int]] = {}
        for j, i in enumerate(self.order[1:], start=1):
            children.setdefault(self.order.index(self.nodes[i].parent), []).append(j)
        out: list[int | None] = []
        for node, nxt in zip(path, path[1:] + [None], strict=True):
            if node in children:
                out.append(None if nxt is None else children[node].index(nxt))
        return out


class TreeGrowth(Growth):
    """EAGLE-2's dynamic tree of at most `nodes` drafted nodes, `max_depth` deep, k = `topk` children per expanded
    node and nodes expanded per level (see the module docstring)."""

    def __init__(
        self,
        root: int,
        topk: int,
        nodes: int,
        max_depth: int,
        stop_ids: set[int],
        cfg: GenConfig,
        generator: Sampler | None,
        index: int,
    ) -> None:
        super().__init__(root)
        self.topk, self.n, self.max_depth, self.stop_ids, self.cfg = topk, nodes, max_depth, stop_ids, cfg
        self.noise = generator if isinstance(generator, PositionalNoise) and cfg.do_sample else None
        self.index = index  # the answer index of the root's children
        self.level = 0

    def grow(self, parents: list[int], logits: torch.Tensor) -> tuple[list[int], bool]:
        if self.noise is not None:  # positional sampling: the twig's scores perturbed as the target's will be
            indices = [self.index + self.nodes[p].depth for p in parents]
            logp = self.noise.scores(logits, self.cfg, indices).log_softmax(-1)
        elif self.cfg.do_sample:  # the filtered distribution's: any fixed choice of drafts is lossless
            logp = probs_from_logits(logits, self.cfg).log()
        else:
            logp = logits.float().log_softmax(-1)
        self.level += 1
        new = self._expand(parents, logp)
        live = [i for i in new if self.nodes[i].token not in self.stop_ids]  # nothing follows a stop token
        frontier = [i for i in live if self.nodes[i].score > self._nth_best()]  # else no child of it is kept
        frontier = sorted(frontier, key=lambda i: -self.nodes[i].score)[: self.topk]
        if self.level >= self.max_depth or not frontier:
            return [], False
        return frontier, True

    def _expand(self, parents: list[int], logp: torch.Tensor) -> list[int]:
        """Add the top-k children of each parent (logp [len(parents), V]) as candidates; their node indices."""
        vals, ids = logp.topk(min(self.topk, logp.shape[-1]), dim=-1)  # [n, k]
        new = []
        for parent, row_vals, row_ids in zip(parents, vals.tolist(), ids.tolist(), strict=True):
            p = self.nodes[parent]
            for v, t in zip(row_vals, row_ids, strict=True):
                if v != float("-inf"):  # outside the draft vocabulary or the sampling filters
                    new.append(len(self.nodes))
                    self.nodes.append(Node(t, parent, p.depth + 1, p.score + v))
        return new

    def _nth_best(self) -> float:
        """The N-th best candidate score so far (−inf with fewer): a node scoring no more than it can have no
        descendant among the best N (a child never outscores its parent, and ties keep the shallower)."""
        if len(self.nodes) - 1 < self.n:
            return float("-inf")
        return sorted((n.score for n in self.nodes[1:]), reverse=True)[self.n - 1]

    def draft(self) -> TreeDraft:
        """The root and the best N candidates, ordered by depth (a parent before its children), siblings best
        first. Ties put the shallower node first, so a child is never kept without its parent."""
        ranked = sorted(range(1, len(self.nodes)), key=lambda i: (-self.nodes[i].score, self.nodes[i].depth, i))
        chosen = set(ranked[: self.n])
        assert all(self.nodes[i].parent in chosen or self.nodes[i].parent == 0 for i in chosen), "not a tree"
        self.order = [0] + sorted(chosen, key=lambda i: (self.nodes[i].depth, -self.nodes[i].score, i))
        where = {node: j for j, node in enumerate(self.order)}
        parents = [-1] + [where[self.nodes[i].parent] for i in self.order[1:]]
        return TreeDraft([self.nodes[i].token for i in self.order], parents)


class ChainGrowth(Growth):
    """At most `budget` drafts in a row, each the twig's best token after the newest (sequential sampling: drawn
    from its distribution q, kept in `probs`; positional: the best of its perturbed scores), stopping at a stop
    token or below the confidence `threshold`. `index`: the answer index of the first draft."""

    def __init__(
        self,
        root: int,
        budget: int,
        threshold: float,
        stop_ids: set[int],
        cfg: GenConfig,
        generator: Sampler | None,
        index: int,
    ) -> None:
        super().__init__(root)
        self.budget, self.threshold, self.stop_ids = budget, threshold, stop_ids
        self.cfg, self.generator, self.index = cfg, generator, index
        self.probs: list[torch.Tensor] = []

    def grow(self, parents: list[int], logits: torch.Tensor) -> tuple[list[int], bool]:
        logits = logits[-1]  # [V]: after the newest draft
        if self.cfg.do_sample and isinstance(self.generator, PositionalNoise):
            tempered = tempered_logits(logits, self.cfg)  # [V], filtered once for the draft and its confidence
            scores = self.generator.perturb(tempered[None], [self.index + len(self.nodes) - 1])[0]  # [V]
            token = int(scores.argmax())  # a sample of q, as sequential sampling's draft; τ reads q(token) alike
            confidence = float(tempered.softmax(-1)[token]) if self.threshold > 0 else 1.0
        elif self.cfg.do_sample:
            q = probs_from_logits(logits, self.cfg)
            token = int(torch.multinomial(q, 1, generator=self.generator))
            self.probs.append(q)
            confidence = float(q[token])
        else:
            token = int(logits.argmax())
            confidence = float(logits.float().softmax(-1)[token]) if self.threshold > 0 else 1.0
        self.nodes.append(Node(token, len(self.nodes) - 1, len(self.nodes), 0.0))
        done = len(self.nodes) - 1 >= self.budget or token in self.stop_ids or confidence < self.threshold
        return [len(self.nodes) - 1], not done

    def draft(self) -> TreeDraft:
        self.order = list(range(len(self.nodes)))
        probs = torch.stack(self.probs) if self.probs else None
        return TreeDraft.chain(self.nodes[0].token, [n.token for n in self.nodes[1:]], probs)


def commit_path(
    state: DecodeState,
    growth: Growth,
    path: list[int],
    base_slots: list[int],
    twig_slots: list[int],
    pending: list[torch.Tensor],
    start: int,
    K: int,
) -> None:
    """Keep the root (at position `start`) and the accepted `path` (indices into `growth.order`) in every cache:
    the deep layers hold this step's nodes in verification order, layers 1..K the nodes in `base_slots`, the twig
    those in `twig_slots` (each the order they were run in) — a gather of each cache's tail, or a crop where the
    path is the tail's start. The path's nodes the twig never read join `pending`."""
    nodes = [growth.order[i] for i in path]
    deep = range(K, len(state.cache))
    state.cache.gather_tail(len(growth.order), path, deep)
    kpos = {node: j for j, node in enumerate(base_slots)}
    state.cache.gather_tail(len(base_slots), [kpos[i] for i in nodes], range(K))
    tpos = {node: j for j, node in enumerate(twig_slots)}
    fed = [i for i in nodes if i in tpos]
    assert nodes[: len(fed)] == fed, "only the path's last nodes may have skipped the twig"
    if twig_slots:
        state.twig_cache.gather_tail(len(twig_slots), [tpos[i] for i in fed])
    pending += [growth.nodes[i].hidden for i in nodes[len(fed) :]]
    state.next_position = start + len(path)
