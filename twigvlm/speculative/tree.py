"""Tree drafting for self-speculative decoding: the draft tree, the lossless accept rule, and the step loop.

A step drafts a tree below the newest accepted token (the root, node 0) instead of a chain: each node is one
drafted token, its parent the token before it. The full model scores every node in one pass (row i of the target
logits predicts the token after node i's path), and `accept_tree` picks the accepted path:

- greedy: from the root, follow the child whose token is the target's argmax while there is one; the target's
  argmax after the last accepted node is the step's extra token;
- sampling (EAGLE's rule for deterministic drafts, lossless): at a node, with p the target's distribution there,
  try its children in order: accept child x with probability p(x); on rejection set p(x) = 0 and renormalise;
  when every child is rejected (or there is none), sample the extra token from what remains of p. This is
  sampling from p by asking "is it x₁? x₂? …" in turn, so the output follows the target exactly.

The loop talks to the model only through `TreeModel` (propose / verify / commit), as the chain's loop does
through `SpecModel`, so stub models with hand-written logits test accept and commit directly; the engine's
drafter is `tree_twig.TwigTreeModel`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import GenConfig, SpecConfig
from ..runtime.sampling import probs_from_logits
from .stats import SpecStats


@dataclass
class TreeDraft:
    """A draft tree of N + 1 nodes. Node 0 is the root (the newest accepted token, not drafted); nodes 1..N are
    drafted tokens, each after its parent (parents[i] < i), siblings in the drafter's order of preference."""

    tokens: list[int]  # [N + 1]
    parents: list[int]  # [N + 1], parents[0] == -1

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens or self.parents[0] != -1:
            raise ValueError("a draft tree needs a root (parent -1) and one parent per token")
        if any(not 0 <= p < i for i, p in enumerate(self.parents[1:], start=1)):
            raise ValueError("every node's parent must come before it")

    @property
    def size(self) -> int:
        """N, the drafted nodes (the root not counted)."""
        return len(self.tokens) - 1

    def depths(self) -> list[int]:
        """Depth of every node; the root's is 0."""
        out = [0] * len(self.tokens)
        for i in range(1, len(self.tokens)):
            out[i] = out[self.parents[i]] + 1
        return out

    def children(self) -> list[list[int]]:
        """Each node's children, in order."""
        out: list[list[int]] = [[] for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            out[self.parents[i]].append(i)
        return out

    def ancestry(self) -> torch.Tensor:
        """[N + 1, N + 1] boolean: [i, j] is True when node j is node i or one of its ancestors (the tree's
        attention mask: a node sees its own path)."""
        n = len(self.tokens)
        anc = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            anc[i] |= anc[self.parents[i]]
        return anc

    @staticmethod
    def chain(last: int, ids: list[int]) -> TreeDraft:
        """The tree of a chain draft: last → ids[0] → ids[1] → …"""
        return TreeDraft([last, *ids], list(range(-1, len(ids))))


class TreeModel(Protocol):
    def propose(self, last: int, max_depth: int, stop_ids: set[int]) -> TreeDraft:
        """Feed `last` (the newest accepted token, not yet in any cache) and draft a tree at most max_depth deep."""

    def verify(self, tree: TreeDraft) -> torch.Tensor:
        """Target logits [N + 1, V]: row i predicts the token after node i's path."""

    def commit(self, path: list[int]) -> None:
        """Keep the root and the accepted path (node indices, the root first) in every cache; drop the rest."""


def accept_tree(
    tree: TreeDraft, target_logits: torch.Tensor, cfg: GenConfig, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """(the accepted path as node indices, the root first; the token that follows it). See the module docstring."""
    children, path = tree.children(), [0]
    if not cfg.do_sample:
        target = target_logits.argmax(dim=-1).tolist()  # [N + 1]
        while True:
            node = path[-1]
            match = next((c for c in children[node] if tree.tokens[c] == target[node]), None)
            if match is None:
                return path, target[node]
            path.append(match)
    while True:
        node = path[-1]
        p = probs_from_logits(target_logits[node], cfg)  # [V], the same filters as plain sampling
        nxt = _try_children(p, [(c, tree.tokens[c]) for c in children[node]], generator)
        if isinstance(nxt, tuple):
            return path, nxt[0]
        path.append(nxt)


def _try_children(
    p: torch.Tensor, candidates: list[tuple[int, int]], generator: torch.Generator | None
) -> int | tuple[int]:
    """EAGLE's sibling rule at one node: the accepted child's node index, or (the token sampled from the residual,)."""
    residual = p.clone()
    for node, token in candidates:
        if torch.rand((), generator=generator, device=p.device) < residual[token]:
            return node
        residual[token] = 0.0
        total = residual.sum()
        if total <= 0:  # only rounding can get here (the rejected tokens held all the mass)
            return (int(p.argmax()),)
        residual = residual / total
    return (int(torch.multinomial(residual, 1, generator=generator)),)


def tree_blocks(
    model: TreeModel,
    first: int,
    cfg: GenConfig,
    spec: SpecConfig,
    generator: torch.Generator | None,
    stats: SpecStats,
    stop_ids: set[int],
) -> Iterator[list[int]]:
    """Yield blocks of new tokens: [first], then each verification's accepted path plus its extra token."""
    yield [first]
    last, produced = first, 1
    while produced < cfg.max_new_tokens:
        depth = min(spec.tree_depth, cfg.max_new_tokens - produced - 1)  # a step emits at most depth + 1 tokens
        t0 = time.perf_counter()
        tree = model.propose(last, depth, stop_ids)
        t1 = time.perf_counter()
        logits = model.verify(tree)
        path, nxt = accept_tree(tree, logits, cfg, generator)
        model.commit(path)
        stats.add_step(tree.size, len(path) - 1, t1 - t0, time.perf_counter() - t1)
        block = [tree.tokens[i] for i in path[1:]] + [nxt]
        produced += len(block)
        last = nxt
        yield block
