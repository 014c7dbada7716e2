"""The speculative step, once for every drafter: draft → verify → accept → commit.

A drafter (`Drafter`) proposes a `TreeDraft` below the newest accepted token: a chain is a tree with one child per
node, a draft tree (EAGLE-2-style) has several. The full model scores every node in one pass (row i of the target
logits predicts the token after node i's path), and `accept` picks the accepted path and the token after it:

- greedy: from the root, follow the child whose token is the target's argmax while there is one; the target's
  argmax after the last accepted node is the step's extra token;
- sampling, a chain drawn from the drafter's distributions q (`TreeDraft.probs`): accept d_i with probability
  min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from normalize(max(p_i − q_i, 0)); when all are
  accepted, sample the extra token from p after the last (speculative sampling: the target's distribution exactly);
- sampling, deterministic drafts (a tree's top-k; EAGLE's rule, lossless): at a node, with p the target's
  distribution there, try its children in order: accept child x with probability p(x); on rejection set
  p(x) = 0 and renormalise; when every child is rejected (or there is none), sample the extra token from what
  remains of p — sampling from p by asking "is it x₁? x₂? …" in turn.
- positional sampling (`runtime.sampling.PositionalNoise`): the greedy rule on the target's perturbed scores, each
  node's row perturbed with the noise of the answer index it predicts — the token plain sampling would pick
  there, so the text is the same whatever was drafted.

`commit` keeps the root and the accepted path in every cache. The loop talks to a drafter only through `Drafter`,
so stub drafters with hand-written logits test the accept rules and the loop directly; the engine's drafters are
`chain.TwigChainDrafter` and `tree.TwigTreeDrafter`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import GenConfig
from ..runtime.sampling import PositionalNoise, Sampler, probs_from_logits
from .gate import DraftGate
from .stats import SpecStats


@dataclass
class TreeDraft:
    """A draft tree of N + 1 nodes. Node 0 is the root (the newest accepted token, not drafted); nodes 1..N are
    drafted tokens, each after its parent (parents[i] < i), siblings in the drafter's order of preference."""

    tokens: list[int]  # [N + 1]
    parents: list[int]  # [N + 1], parents[0] == -1
    probs: torch.Tensor | None = None  # [N, V]: a sampled chain's q_i, the distributions its drafts were drawn from

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens or self.parents[0] != -1:
            raise ValueError("a draft tree needs a root (parent -1) and one parent per token")
        if any(not 0 <= p < i for i, p in enumerate(self.parents[1:], start=1)):
            raise ValueError("every node's parent must come before it")
        if self.probs is not None and self.parents != list(range(-1, len(self.tokens) - 1)):
            raise ValueError("drafts drawn from a distribution (probs) form a chain")

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
    def chain(last: int, ids: list[int], probs: torch.Tensor | None = None) -> TreeDraft:
        """The tree of a chain draft: last → ids[0] → ids[1] → …; probs [len(ids), V] when they were sampled."""
        return TreeDraft([last, *ids], list(range(-1, len(ids))), probs)


class Drafter(Protocol):
    def propose(self, last: int, max_depth: int, stop_ids: set[int], index: int) -> TreeDraft:
        """Feed `last` (the newest accepted token, not yet in any cache) and draft at most max_depth deep; `index`:
        the answer index of the token after `last` (where positional sampling's noise is keyed)."""

    def verify(self, draft: TreeDraft) -> torch.Tensor:
        """Target logits [N + 1, V]: row i predicts the token after node i's path."""

    def commit(self, path: list[int]) -> None:
        """Keep the root and the accepted path (node indices, the root first) in every cache; drop the rest."""


def accept(
    draft: TreeDraft, target_logits: torch.Tensor, cfg: GenConfig, generator: Sampler | None, index: int
) -> tuple[list[int], int]:
    """(the accepted path as node indices, the root first; the token that follows it). See the module docstring.
    `index`: the answer index of the token after the root (node i's row predicts index + its depth)."""
    children, path = draft.children(), [0]
    if isinstance(generator, PositionalNoise) and cfg.do_sample:
        target_logits = generator.scores(target_logits, cfg, [index + d for d in draft.depths()])
    if not cfg.do_sample or isinstance(generator, PositionalNoise):
        target = target_logits.argmax(dim=-1).tolist()  # [N + 1]
        while True:
            node = path[-1]
            match = next((c for c in children[node] if draft.tokens[c] == target[node]), None)
            if match is None:
                return path, target[node]
            path.append(match)
    if draft.probs is not None:
        return _accept_sampled_chain(draft, probs_from_logits(target_logits, cfg), generator)
    while True:
        node = path[-1]
        p = probs_from_logits(target_logits[node], cfg)  # [V], the same filters as plain sampling
        nxt = _try_children(p, [(c, draft.tokens[c]) for c in children[node]], generator)
        if isinstance(nxt, tuple):
            return path, nxt[0]
        path.append(nxt)


def _accept_sampled_chain(
    draft: TreeDraft, p: torch.Tensor, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """Speculative sampling along a chain drawn from q = draft.probs: p [N + 1, V], q [N, V]."""
    q = draft.probs
    for i, d in enumerate(draft.tokens[1:]):
        ratio = (p[i, d] / q[i, d]).clamp(max=1.0)
        if torch.rand((), generator=generator, device=p.device) < ratio:
            continue
        residual = (p[i] - q[i]).clamp(min=0.0)
        residual = residual / residual.sum() if residual.sum() > 0 else p[i]
        return list(range(i + 1)), int(torch.multinomial(residual, 1, generator=generator))
    return list(range(len(draft.tokens))), int(torch.multinomial(p[-1], 1, generator=generator))


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


def speculative_step(
    drafter: Drafter,
    last: int,
    budget: int,
    cfg: GenConfig,
    generator: Sampler | None,
    stats: SpecStats,
    stop_ids: set[int],
    index: int,
) -> tuple[list[int], int, int]:
    """One draft → verify → accept → commit below `last`, at most `budget` deep, `index` the answer index of the
    token after `last`: (the new tokens — the accepted drafts and the target's token after them —, the nodes
    drafted, the drafts accepted); timed into `stats`."""
    t0 = time.perf_counter()
    draft = drafter.propose(last, budget, stop_ids, index)
    t1 = time.perf_counter()
    logits = drafter.verify(draft)
    path, nxt = accept(draft, logits, cfg, generator, index)
    drafter.commit(path)
    accepted = len(path) - 1
    stats.add_step(
        draft.size,
        accepted,
        t1 - t0,
        time.perf_counter() - t1,
        draft.size > 0 and getattr(drafter, "kind", "") == "tree",
    )
    return [draft.tokens[i] for i in path[1:]] + [nxt], draft.size, accepted


def adapt_depth(depth: int, drafted: int, accepted: int, cap: int | None) -> int:
    """The next step's draft depth: with a cap (adaptive γ), one deeper after a draft accepted whole, one
    shallower after a rejection, within 1..cap; without one (or after no draft), unchanged."""
    if cap is None or not drafted:
        return depth
    return min(depth + 1, cap) if accepted == drafted else max(1, depth - 1)


def speculative_blocks(
    drafter: Drafter,
    first: int,
    cfg: GenConfig,
    generator: Sampler | None,
    stats: SpecStats,
    stop_ids: set[int],
    depth: int,
    adaptive_cap: int | None = None,
    gate: DraftGate | None = None,
) -> Iterator[list[int]]:
    """Yield blocks of new tokens: [first], then each verification's accepted path plus its extra token.

    depth: the deepest draft a step asks for (a chain's γ, a tree's D); with `adaptive_cap` it adapts
    (`adapt_depth`). gate: auto's `DraftGate`, which turns drafting off while it measures slower than plain steps
    (a step of depth 0)."""
    yield [first]
    last, produced = first, 1
    while produced < cfg.max_new_tokens:
        asked = depth if gate is None else gate.depth(depth)  # (0 while the gate has drafting off)
        budget = min(asked, cfg.max_new_tokens - produced - 1)  # a step emits at most budget + 1 tokens
        t0 = time.perf_counter()
        block, drafted, accepted = speculative_step(drafter, last, budget, cfg, generator, stats, stop_ids, produced)
        if gate is not None:  # (its plain steps: drafting did not pay)
            stats.undrafted += gate.record(len(block), time.perf_counter() - t0, budget > 0)
        depth = adapt_depth(depth, drafted, accepted, adaptive_cap)
        produced += len(block)
        last = block[-1]
        yield block
