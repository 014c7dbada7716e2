"""Self-speculative decoding across the rows of a batch: every drafting row grows its own draft — a chain or a
tree — and one pass verifies them all.

A step (`draft_step`) runs in levels. Level 0 feeds each row's newest token (its root) through base layers 1..K;
the twig then reads the drafting rows' roots (a row's first twig block also carries the states its twig has not
seen yet, `Row.pending`: tokens decoded in steps without drafting). While any row still drafts, each row's growth
(`speculative.growth`: `ChainGrowth` or `TreeGrowth`) turns the twig's logits at the nodes it asked for into the
nodes to run next, and they go through layers 1..K — and through the twig, where that row drafts on — in one pass
for every row, each row's block padded at its end (`rows.run_rows`); a tree's nodes see the committed prefix and
their own path (each row's tail mask). A tree's kept nodes that were never expanded run through layers 1..K in
one more pass. One pass over layers K+1..L then verifies every row's draft in verification order, with each tree's
ancestry as its mask; each row accepts its own path (`loop.accept`, the solo rule, greedy or sampled) and keeps it
in its caches on its own (`growth.commit_path`, as a drafter alone does). Rows that do not draft (not speculative,
or no budget left) take part in level 0 and the verification only.

What a row drafts (`Plan`) is the batch's choice (`batch_plan`, Sequoia's criterion as `choice.best_drafter`
for one row): a verification of R rows × (γ + 1) tokens, or R × (N + 1) for trees, costs more as R grows, and
drafting stops paying where the products stop being bound by reading the weights; the step then runs without
drafts (`undrafted` in each row's statistics). The cost model times passes of one row, so it misses what a batch
adds (each row's attention, masks, the bookkeeping): each kind of step's measured tokens per second against the
model's (`Calibration`, kept in the twig's `DraftRecord`) scales its expectation, so the choice follows what the
steps measure. A kind with little measured time is tried now and then (every `EXPLORE_EVERY`-th step) whatever
the rates say — among the kinds these requests allow, and only in steps where auto's rows alone draft (a step
beside rows that named their drafter measures no one kind, and is not recorded) —, so that no kind's
calibration stays at its prior while the others are measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import SpecConfig
from ..engine import Engine
from ..runtime.sampling import pick_tokens
from ..speculative.choice import Costs, best_tree_value
from ..speculative.growth import ChainGrowth, Growth, TreeGrowth, commit_path
from ..speculative.loop import accept
from .row import Row
from .rows import Slots, run_rows

PLAIN, CHAIN, TREE = "batch plain", "batch chain", "batch tree"  # the batch's step kinds in a `Calibration`
KINDS = (PLAIN, CHAIN, TREE)
PENDING_FLUSH = 8  # a row's twig catches up (`catch_up`) once this many states wait for it
EXPLORE_EVERY = 8  # every so many steps of several rows, a kind measured for less than EXPLORE_S is tried
EXPLORE_S = 2.0


@dataclass(frozen=True)
class Plan:
    """What one row drafts in a step: a chain of at most `depth` tokens, or a tree of at most `nodes` nodes,
    `depth` deep, `topk` children per expanded node."""

    kind: str  # "chain" or "tree"
    depth: int
    nodes: int = 0
    topk: int = 0

    def growth(self, row: Row) -> Growth:
        """The row's growth for this step (its own stop tokens, sampling, threshold and generator)."""
        stop = row.eos | row.stop_ids
        index = len(row.ids)  # the answer index of the root's children
        if self.kind == "tree":
            return TreeGrowth(row.next_token, self.topk, self.nodes, self.depth, stop, row.cfg, row.generator, index)
        assert row.choice is not None
        threshold = row.choice.spec.threshold
        return ChainGrowth(row.next_token, self.depth, threshold, stop, row.cfg, row.generator, index)

    def within(self, spec: SpecConfig, left: int) -> Plan:
        """This plan for a row whose request allows `spec`'s draft lengths and tree sizes at most, and whose answer
        leaves room for `left` drafts (≥ 1)."""
        if self.kind == "chain":
            return Plan("chain", min(self.depth, spec.max_draft_len, left))
        return Plan(
            "tree",
            min(self.depth, spec.tree_depth, left),
            min(self.nodes, spec.tree_nodes),
            min(self.topk, spec.tree_topk),
        )


def feasible_kinds(drafting: int, longest: int, tree: tuple[int, int, int] | None) -> list[str]:
    """The kinds of step `batch_plan` can choose among for these bounds (a tree needs 2 nodes and 2 levels)."""
    kinds = [PLAIN]
    if drafting and longest >= 1:
        kinds.append(CHAIN)
    if drafting and tree is not None and tree[1] >= 2 and tree[2] >= 2:
        kinds.append(TREE)
    return kinds


def batch_plan(
    costs: Costs,
    a: tuple[float, ...],
    rows: int,
    drafting: int,
    longest: int,
    tree: tuple[int, int, int] | None = None,
    scale: dict[str, float] | None = None,
    explore: str | None = None,
) -> tuple[Plan | None, float]:
    """(the plan with the most expected tokens per second for a batch of `rows` of which `drafting` may draft —
    None: no drafting —, the cost model's tokens per second for it), when the twig's r-th best token is the
    target's with probability a[r]. Chains of γ ≤ `longest`: γ levels of every row through layers 1..K and the
    twig, a verification of rows × (γ + 1) tokens; trees (`tree` = (k, most nodes, most depth); None: chains
    only): a level of every row, D − 1 levels of rows × k nodes, the kept nodes through layers 1..K, a
    verification of rows × (N + 1) (the padded passes' cost). `scale`: each kind's measured over expected rate
    (`Calibration.factor`), which the choice goes by; `explore`: the kind to take whatever the rates say (its
    best plan), so that every kind's calibration is measured."""
    scale = scale or {}
    plain = rows / (costs.t_base(rows) + costs.t_verify(rows))
    options: list[tuple[float, str, Plan | None, float]] = [(plain * scale.get(PLAIN, 1.0), PLAIN, None, plain)]
    if drafting:
        for g in range(1, longest + 1):
            tokens = rows - drafting + drafting * sum(a[0] ** i for i in range(g + 1))
            model = tokens / (g * costs.t_level(rows) + costs.t_base(rows) + costs.t_verify(rows * (g + 1)))
            options.append((model * scale.get(CHAIN, 1.0), CHAIN, Plan("chain", g), model))
    if drafting and tree is not None:
        k, most_nodes, most_depth = tree
        ranks = tuple(a[:k]) + (0.0,) * max(0, k - len(a))
        for d in range(2, most_depth + 1):  # (depth 1 is a chain's γ = 1 with more nodes verified)
            levels = costs.t_level(rows) + (d - 1) * costs.t_level(rows * k)
            for n in range(2, most_nodes + 1):
                tokens = rows - drafting + drafting * (1 + best_tree_value(ranks, n + 1, d))
                model = tokens / (levels + costs.t_base(rows * n) + costs.t_verify(rows * (n + 1)))
                options.append((model * scale.get(TREE, 1.0), TREE, Plan("tree", d, n, k), model))
    if explore is not None and any(kind == explore for _, kind, _, _ in options):
        options = [o for o in options if o[1] == explore]
    _, _, plan, model = max(options, key=lambda o: o[0])
    return plan, model


@torch.inference_mode()
def draft_step(
    engine: Engine, slots: Slots, twig_slots: Slots, rows: list[Row], plans: list[Plan | None]
) -> list[tuple[list[int], int, int]]:
    """One speculative step for the batch `rows` (slots 0..R-1, in order): row r drafts as plans[r] says (None:
    no drafts; a row without speculation must have None). Returns per row (its new tokens — the accepted drafts
    and the target's token after them —, nodes drafted, drafts accepted); caches and positions are committed.
    Every drafting row's statistics get the step's draft and verification times."""
    assert engine.twig is not None
    K = engine.twig.config.K
    starts = [row.state.next_position for row in rows]
    drafts = [None if plan is None else plan.growth(row) for row, plan in zip(rows, plans, strict=True)]
    growths = [Growth(row.next_token) if g is None else g for row, g in zip(rows, drafts, strict=True)]
    trees = any(isinstance(g, TreeGrowth) for g in drafts)  # chains alone: every mask is causal
    passes = _Passes(engine, slots, twig_slots, rows, growths, starts, trees)
    t0 = time.perf_counter()
    passes.base([[0]] * len(rows))
    feeding = [[0] if g is not None else [] for g in drafts]
    logits = passes.twig(feeding)
    while any(feeding):
        grown = [g.grow(f, x) if f else ([], False) for g, f, x in zip(growths, feeding, logits, strict=True)]
        runs = [run for run, _ in grown]
        if any(runs):
            passes.base(runs)
        feeding = [run if more else [] for run, more in grown]
        if any(feeding):
            logits = passes.twig(feeding)
    tree_drafts = [None if g is None else g.draft() for g in drafts]
    missing = [g.missing() for g in growths]
    if any(missing):
        passes.base(missing)
    t1 = time.perf_counter()
    target = passes.verify()  # per row [len(order), V]
    results = []
    for r, row in enumerate(rows):
        growth, draft = growths[r], tree_drafts[r]
        if row.choice is None:  # not speculative: its token as a plain step picks it
            row.state.next_position = starts[r] + 1
            results.append(([int(pick_tokens(target[r], row.cfg, row.generator, len(row.ids))[0])], 0, 0))
            continue
        draft = draft or growth.draft()  # a drafting row without drafts this step: its root alone
        path, nxt = accept(draft, target[r], row.cfg, row.generator, len(row.ids))
        row.ranks += growth.ranks(path)
        commit_path(row.state, growth, path, passes.kslots[r], passes.tslots[r], row.pending, starts[r], K)
        results.append(([draft.tokens[i] for i in path[1:]] + [nxt], draft.size, len(path) - 1))
    t2 = time.perf_counter()
    for row, growth, (_, n, a) in zip(rows, growths, results, strict=True):
        if row.spec_stats is not None and row.choice is not None:
            row.spec_stats.add_step(n, a, t1 - t0, t2 - t1, n > 0 and isinstance(growth, TreeGrowth))
    return results


class _Passes:
    """The passes of one `draft_step`: each row's nodes through layers 1..K (`base`), the twig (`twig`) and
    K+1..L (`verify`), one block for all rows; which nodes went into each row's caches this step, in order
    (`kslots`, `tslots`: what `commit_path` gathers)."""

    def __init__(
        self,
        engine: Engine,
        slots: Slots,
        twig_slots: Slots,
        rows: list[Row],
        growths: list[Growth],
        starts: list[int],
        trees: bool,
    ) -> None:
        self.engine, self.slots, self.twig_slots, self.rows = engine, slots, twig_slots, rows
        self.growths, self.starts, self.trees = growths, starts, trees
        self.K = engine.twig.config.K
        self.device = rows[0].state.cache[0].keys().device
        self.kslots: list[list[int]] = [[] for _ in rows]
        self.tslots: list[list[int]] = [[] for _ in rows]

    def base(self, ids: list[list[int]]) -> None:
        """Each row's nodes ids[r] through layers 1..K; their layer-K states go into their nodes."""
        q = max(len(i) for i in ids)
        tokens = [  # [R, q]: each row's nodes, padded with its root
            [g.nodes[i].token for i in run] + [g.nodes[0].token] * (q - len(run))
            for g, run in zip(self.growths, ids, strict=True)
        ]
        hidden = self.engine.adapter.embed(torch.tensor(tokens, device=self.device))  # [R, q, H]
        for slots, run in zip(self.kslots, ids, strict=True):
            slots += run
        caches = [row.state.cache for row in self.rows]
        tails = self._tails(ids, self.kslots, q) if self.trees and ids != [[0]] * len(ids) else None
        out = run_rows(self.engine, self.engine.adapter.layers[: self.K], self.slots, 0, caches, hidden,
                       self._positions(ids, q), [len(i) for i in ids], tails)  # fmt: skip
        for g, run, h in zip(self.growths, ids, out.split(1), strict=True):
            for j, i in enumerate(run):
                g.nodes[i].hidden = h[:, j : j + 1]

    def twig(self, ids: list[list[int]]) -> list[torch.Tensor | None]:
        """The twig on each row's nodes ids[r] (a row's first block: after its pending states); the twig's logits
        [len(ids[r]), V] at them (None for rows with none)."""
        engine, first = self.engine, not any(self.tslots)
        blocks: list[list[torch.Tensor]] = []
        lead = []  # pending states before each row's nodes
        for row, g, run in zip(self.rows, self.growths, ids, strict=True):
            pending = row.pending if first and run else []
            if first and run:
                row.pending = []
            blocks.append(pending + [g.nodes[i].hidden for i in run])
            lead.append(len(pending))
        for slots, run in zip(self.tslots, ids, strict=True):
            slots += run
        q = max(len(b) for b in blocks)
        block = _padded(blocks)  # [R, q, H]
        positions = self._positions(ids, q, lead)
        tails = self._tails(ids, self.tslots, q) if self.trees and not first else None  # (first: pending + root)
        caches = [row.state.twig_cache for row in self.rows]
        out = run_rows(engine, engine.twig.layers, self.twig_slots, 0, caches, block, positions,
                       [len(b) for b in blocks], tails)  # fmt: skip
        picked = torch.cat([out[r, p : p + len(run)] for r, (p, run) in enumerate(zip(lead, ids, strict=True))])
        head = next(row.state.draft_head for row, run in zip(self.rows, ids, strict=True) if run)  # one twig
        logits = engine.twig_logits(picked.unsqueeze(0), draft=head is not None, rows=head)[0]  # [Σ n, V]
        return [x if run else None for x, run in zip(logits.split([len(run) for run in ids]), ids, strict=True)]

    def verify(self) -> list[torch.Tensor]:
        """Every row's nodes in verification order through layers K+1..L: the target logits per row [n_r, V]."""
        orders = [g.order for g in self.growths]
        counts = [len(o) for o in orders]
        q = max(counts)
        states = [[g.nodes[i].hidden for i in o] for g, o in zip(self.growths, orders, strict=True)]
        block = _padded(states)  # [R, q, H]
        tails = self._tails(orders, orders, q) if self.trees else None
        caches = [row.state.cache for row in self.rows]
        layers = self.engine.adapter.layers[self.K :]
        out = run_rows(self.engine, layers, self.slots, self.K, caches, block, self._positions(orders, q), counts,
                       tails)  # fmt: skip
        wanted = torch.cat([out[r, : counts[r]] for r in range(len(counts))], dim=0).unsqueeze(0)  # [1, Σ n, H]
        return list(self.engine.logits(wanted)[0].split(counts))

    def _positions(self, ids: list[list[int]], q: int, lead: list[int] | None = None) -> torch.Tensor:
        """Position ids [(3,) R, q]: each row's leading pending states (`lead`), then its nodes (the root's
        position + depth), then padding (counting on)."""
        adapter, out = self.engine.adapter, []
        for r, (g, run) in enumerate(zip(self.growths, ids, strict=True)):
            p = lead[r] if lead else 0
            at = list(range(self.starts[r] - p, self.starts[r])) + g.positions(self.starts[r], run)
            end = at[-1] + 1 if at else self.starts[r]
            out.append(adapter.positions_at(at + list(range(end, end + q - len(at)))))
        return torch.cat(out, dim=-2)

    def _tails(self, ids: list[list[int]], slots: list[list[int]], q: int) -> torch.Tensor:
        """Masks [R, q, m] over each row's last m keys once its block is in: its nodes ids[r] see the prefix and
        their own path among this step's entries (`slots[r]`, ending with ids[r]); its padding is seen by none
        (padding queries see everything: their output is never read)."""
        m = max(len(s) + q - len(run) for s, run in zip(slots, ids, strict=True))
        out = torch.ones((len(ids), q, m), dtype=torch.bool)
        for r, (g, run, s) in enumerate(zip(self.growths, ids, slots, strict=True)):
            if run:
                lead = m - len(s) - (q - len(run))
                out[r, : len(run), lead : lead + len(s)] = torch.tensor(g.mask(run, s), dtype=torch.bool)
                out[r, : len(run), lead + len(s) :] = False
        return out.to(self.device)


@torch.inference_mode()
def catch_up(engine: Engine, twig_slots: Slots, rows: list[Row]) -> None:
    """The twig on every row's pending layer-K states (their keys and values into its caches; no output needed),
    so that what waits for the twig — and so the block a step writes into its caches — stays short."""
    blocks = [row.pending for row in rows]
    q = max(len(b) for b in blocks)
    block = _padded(blocks)  # [R, q, H]
    starts = [row.state.next_position - len(b) for row, b in zip(rows, blocks, strict=True)]
    positions = torch.cat([engine.adapter.text_positions(s, q) for s in starts], dim=-2)
    caches = [row.state.twig_cache for row in rows]
    run_rows(engine, engine.twig.layers, twig_slots, 0, caches, block, positions, [len(b) for b in blocks])
    for row in rows:
        row.pending = []


def _padded(blocks: list[list[torch.Tensor]]) -> torch.Tensor:
    """Each row's states [1, 1, H] in a row of one block [R, q, H], shorter rows padded at the end (with the first
    state of any row: padding is computed, never read)."""
    q = max(len(b) for b in blocks)
    pad = next(b[0] for b in blocks if b)
    return torch.cat([torch.cat(b + [pad] * (q - len(b)), dim=1) for b in blocks], dim=0)
