"""Batched decoding: several generations share every decode step, each with its own prompt, pictures, pruning,
drafting, positions, sampling and stopping.

Each request is encoded and prefilled on its own — its pruning too (TTP, FastV, VisionZip, CDPruner, DART) —
into a *slot* of caches the batch shares (`rows.Slots`; the twig's caches too, for requests that draft). A decode
step then feeds every unfinished request's next token through each layer at once (`rows.run_rows`), so the
products stream each weight once for all rows. A row that finishes leaves the batch at once and the rows after
it move down a slot each, so the batch stays dense.

Speculative requests draft inside the batch: alone, a row takes its own drafter's steps (chain or tree, as auto
or the request chose: `speculative.loop`); with others, every drafting row grows its draft — the chain or tree it
asked for by name, or for auto's rows what the batch's costs favour: chains, trees, or none at all where a larger
batch gains nothing from drafting (counted in the row's `undrafted` statistic) — and one pass verifies all
(`batch_draft`). A row's twig skips the tokens of steps without drafting until it drafts again (`Row.pending`).

Each row computes what it would alone up to the order of additions in products over several rows; the tests hold
every row to its solo run's greedy ids.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from ..adapters.base import Encoded
from ..config import GenConfig, PruneConfig, SpecConfig
from ..engine import Engine
from ..errors import require_batch_one
from ..runtime.cache import KVCache
from ..runtime.sampling import make_generator, pick_tokens
from ..speculative.chain import TwigChainDrafter
from ..speculative.choice import (
    DraftRecord,
    choose_drafter,
    draft_depth,
    draft_gate,
    make_drafter,
    probe_seconds,
    step_costs,
)
from ..speculative.loop import adapt_depth, speculative_step
from ..speculative.stats import SpecStats
from ..speculative.tree import TwigTreeDrafter
from .batch_draft import (
    EXPLORE_EVERY,
    EXPLORE_S,
    KINDS,
    PENDING_FLUSH,
    PLAIN,
    Plan,
    batch_plan,
    catch_up,
    draft_step,
    feasible_kinds,
)
from .loop import _prefill, check_pruning, check_window, stopping
from .row import Row
from .rows import Slots, row_positions, run_rows
from .stats import GenerationResult, generation_stats

GROW_TOKENS = 64  # a row's slots hold room for this many more of its tokens; they grow (doubling) as it writes them


@torch.inference_mode()
def batch_step(engine: Engine, slots: Slots, rows: list[Row]) -> torch.Tensor:
    """One token for each row (their caches in `slots` 0..R-1, in order) through every base layer at once: logits
    [R, V]. Each row's positions advance by one; a drafting row's layer-K state waits for its twig (`pending`)."""
    adapter = engine.adapter
    states = [row.state for row in rows]
    caches = [s.cache for s in states]
    device = caches[0][0].keys().device
    hidden = adapter.embed(torch.tensor([row.next_token for row in rows], device=device).view(-1, 1))  # [R, 1, H]
    positions = row_positions(engine, [s.next_position for s in states], 1)  # [(3,) R, 1]
    for s in states:
        s.next_position += 1
    ones = [1] * len(rows)
    split = engine.twig.config.K if any(row.choice for row in rows) else 0
    if split:
        hidden = run_rows(engine, adapter.layers[:split], slots, 0, caches, hidden, positions, ones)
        for r, row in enumerate(rows):
            if row.choice is not None:
                row.pending.append(hidden[r : r + 1])
    hidden = run_rows(engine, adapter.layers[split:], slots, split, caches, hidden, positions, ones)
    return engine.logits(hidden)[:, -1]  # [R, V]


class BatchSession:
    """Requests that share decode steps, joining and leaving at step boundaries: `add` prefills a request into
    the next slot (its first token taken), `step` gives every active row its next tokens, `drop` takes a row out
    (finished or cancelled; the rows after it move down a slot). The slots grow when a request needs more room
    (every row's caches move into the larger buffers). `record`: the twig's `DraftRecord` that drafting rows read
    (auto's costs and acceptance) and add to. `max_step_tokens`: the token budget of a step — drafts are cut so
    that a verification feeds at most this many tokens (a step still gives every row one token)."""

    def __init__(
        self, engine: Engine, max_rows: int, record: DraftRecord | None = None, max_step_tokens: int | None = None
    ) -> None:
        self.engine, self.max_rows = engine, max_rows
        self.max_step_tokens = max_step_tokens  # a step's verification feeds at most this many tokens (≥ 1 per row)
        self.record = record if record is not None else DraftRecord()
        self.slots: Slots | None = None
        self.twig_slots: Slots | None = None  # the drafting rows' twig caches (made when the first one joins)
        self._slack = 0  # the fewest free entries in any layer of the slots past a step's room, at the last check
        self._written = 0  # the most tokens one row took since (steps before the next check: `_grow`)
        self.active: list[Row] = []
        self.drafted_steps = self.undrafted_steps = 0  # steps of several rows with and without drafting
        self.together_steps = 0  # steps of several rows where auto chose the plan

    @property
    def full(self) -> bool:
        return len(self.active) >= self.max_rows

    def kv_bytes(self) -> tuple[int, int]:
        """(bytes of keys and values the active rows hold, bytes the slots reserve)."""
        held = sum(row.state.kv_bytes() for row in self.active if row.state is not None)
        return held, sum(s.reserved_bytes() for s in (self.slots, self.twig_slots) if s is not None)

    def add(self, encoded: Encoded, cfg: GenConfig, prune: PruneConfig | None, spec: SpecConfig | None = None) -> Row:
        """Prefill one request (into caches of its own) and take its first token; a speculative request's drafter
        is chosen here (auto measures the passes' costs on those caches the first time). A row that is already
        done (one token asked for, or an end at once) is not kept; the others move into the next free slot."""
        engine, adapter = self.engine, self.engine.adapter
        require_batch_one(encoded.inputs_embeds.shape[0], "a batched request")
        check_window(engine, encoded, cfg)
        check_pruning(engine, encoded, prune)
        assert not self.full, "the batch is full"
        assert spec is None or engine.twig is not None, "speculative rows need an engine with a twig"
        row = Row(encoded, cfg, prune, spec)
        row.eos, row.stop_ids, row.text = stopping(adapter, cfg)
        row.generator = make_generator(cfg, encoded.inputs_embeds.device)
        engine.prepare_programs(rows=self.max_rows > 1)  # compiled steps: made before anything is timed
        row.state = engine.new_state()  # the twig's caches too, where TTP scores with it
        t0 = time.perf_counter()
        logits, row.pruned = _prefill(engine, row.state, encoded, prune, prime_twig=spec is not None)
        row.take(int(pick_tokens(logits, cfg, row.generator, 0)[0]))  # the answer's first token
        if spec is not None:
            row.spec_stats = SpecStats()
            if row.reason is None:
                self._choose(row)
        row.prefill_s = time.perf_counter() - t0 - (row.spec_stats.probe_s if row.spec_stats is not None else 0.0)
        if row.reason is None:
            self.active.append(row)
            try:
                self._place()
            except BaseException:  # (out of memory, say): the batch goes on without it, as before it came
                self.active.pop()
                if not self.active:  # (nor keeps buffers made for it)
                    self.slots = self.twig_slots = None
                raise
        return row

    def reset(self) -> None:
        """Forget every row and buffer without touching them (after a failed step: nothing in them is trusted)."""
        self.active, self.slots, self.twig_slots = [], None, None

    def _choose(self, row: Row) -> None:
        """A speculative row's drafter as a generation alone would choose it (auto: `choose_drafter`, which
        measures the passes' costs once per record); "none" leaves it a plain row."""
        assert row.spec is not None and row.state is not None and row.spec_stats is not None
        probed = probe_seconds()
        choice = choose_drafter(self.engine, row.state, row.cfg, row.spec, self.record)
        row.spec_stats.drafter = choice.kind
        if row.spec.draft != "chain":  # the batch's plan reads the costs: measured now, on the row's own caches
            step_costs(self.engine, row.state, self.record, wide=self.max_rows > 1)
        row.spec_stats.probe_s = probe_seconds() - probed  # not a prefill cost (`GenerationStats.probe_s`)
        if choice.kind != "none":
            row.choice = choice
            row.depth, row.cap = draft_depth(choice)
            row.gate = draft_gate(self.engine, row.state, row.spec, self.record)  # (auto's, while it runs alone)
        elif row.state.twig_cache is not None:
            row.state.twig_cache.release()  # it never drafts: no twig caches, no twig slot

    def step(self) -> None:
        """New tokens for every active row: one each, or a speculative step's (rows that finish stay until
        `drop`ped; they take no more tokens)."""
        rows = self.active
        assert all(row.reason is None for row in rows), "drop finished rows before the next step"
        if not rows or self.slots is None:
            return
        self._grow()
        before = [len(row.ids) for row in rows]
        t0 = time.perf_counter()
        if len(rows) == 1:
            self._alone(rows[0])
        else:
            for row in rows:
                self._leave_solo(row)
            self._together(rows)
        self._written += max(len(row.ids) - n for row, n in zip(rows, before, strict=True))
        seconds = time.perf_counter() - t0
        for row in rows:
            row.decode_s += seconds

    def _alone(self, row: Row) -> None:
        """A lone row's step: its own drafter's (compiled where the steps are), or the engine's one-token step."""
        state = row.state
        assert state is not None
        if row.choice is not None:
            if row.solo is None:
                row.solo = self._solo_drafter(row)
            stop = row.eos | row.stop_ids
            assert row.spec_stats is not None
            t0 = time.perf_counter()
            budget = min(row.budget if row.gate is None else row.gate.depth(row.budget), self._draft_cap(1))
            block, drafted, accepted = speculative_step(
                row.solo, row.next_token, budget, row.cfg, row.generator, row.spec_stats, stop, len(row.ids)
            )
            seconds = time.perf_counter() - t0
            row.solo_tokens, row.solo_s = row.solo_tokens + len(block), row.solo_s + seconds
            if row.gate is not None:  # (its plain steps: drafting did not pay)
                row.spec_stats.undrafted += row.gate.record(len(block), seconds, budget > 0)
            row.depth = adapt_depth(row.depth, drafted, accepted, row.cap)
            row.take_block(block)
            if len(row.solo._pending) >= PENDING_FLUSH:  # (auto's gate paused its drafts: nothing fed the twig)
                self._leave_solo(row)  # its twig catches up, as a batch's undrafted rows do: a short block in its slots
                assert self.twig_slots is not None
                catch_up(self.engine, self.twig_slots, [row])
            return
        with torch.inference_mode():
            ids = torch.tensor([[row.next_token]], device=state.cache[0].keys().device)
            logits = self.engine.step(state, ids)[:, -1]
        row.take(int(pick_tokens(logits, row.cfg, row.generator, len(row.ids))[0]))

    def _solo_drafter(self, row: Row) -> TwigChainDrafter | TwigTreeDrafter:
        """The row's own drafter (`choice.make_drafter`, as a generation alone makes it), taking over its twig's
        pending states and adding to its ranks."""
        assert row.choice is not None and row.state is not None
        drafter = make_drafter(self.engine, row.state, row.cfg, row.generator, row.choice)
        drafter._pending, drafter.ranks = row.pending, row.ranks
        return drafter

    @staticmethod
    def _leave_solo(row: Row) -> None:
        """A row that was alone joins the others' steps: its drafter's pending states become its own."""
        if row.solo is not None:
            row.pending, row.solo = row.solo._pending, None

    def _together(self, rows: list[Row]) -> None:
        """A step of several rows: drafting rows grow their drafts (the chain or tree each asked for by name; for
        auto's rows, what the batch's costs favour) and one pass verifies all; without drafts, one token per row."""
        assert self.slots is not None
        plans, kind, model_rate = self._plans(rows)
        before = sum(len(row.ids) for row in rows)
        t0 = time.perf_counter()
        if not any(plans):
            self.undrafted_steps += any(row.choice for row in rows)
            for row in rows:
                if row.spec_stats is not None and row.choice is not None:
                    row.spec_stats.undrafted += 1
            logits = batch_step(self.engine, self.slots, rows)
            greedy = logits.argmax(dim=-1).tolist()  # [R]: one call for the greedy rows
            for r, row in enumerate(rows):
                if row.cfg.do_sample:  # at its answer index, len(row.ids)
                    row.take(int(pick_tokens(logits[r : r + 1], row.cfg, row.generator, len(row.ids))[0]))
                else:
                    row.take(greedy[r])
        else:
            self.drafted_steps += 1
            assert self.twig_slots is not None
            steps = draft_step(self.engine, self.slots, self.twig_slots, rows, plans)
            for row, plan, (block, drafted, accepted) in zip(rows, plans, steps, strict=True):
                if plan is not None and plan.kind == "chain":  # (a tree's depth stays)
                    row.depth = adapt_depth(row.depth, drafted, accepted, row.cap)
                row.take_block(block)
        if any(len(row.pending) >= PENDING_FLUSH for row in rows):  # rows that did not draft: their twig catches up
            assert self.twig_slots is not None
            catch_up(self.engine, self.twig_slots, rows)
        if model_rate is not None and (kind != PLAIN) == any(plans):  # auto's choice ran, alone: how it fared
            tokens = sum(len(row.ids) for row in rows) - before
            self.record.calibration.record(kind, tokens, time.perf_counter() - t0, model_rate)

    def _plans(self, rows: list[Row]) -> tuple[list[Plan | None], str, float | None]:
        """What each row drafts this step: a chain or tree asked for by name drafts as asked (within the step's
        token budget); auto's rows take the batch's best plan for its costs and the twig's acceptance so far
        (`batch_draft.batch_plan`), each within its own request's bounds. With the kind of step auto chose and the
        cost model's tokens per second for it — None where no row is auto's, or where named rows draft beside
        them (a step of mixed drafts measures no one kind: it is not recorded, nor explored)."""
        cap = self._draft_cap(len(rows))
        out: list[Plan | None] = []
        auto: list[int] = []  # auto's rows, by index
        for r, row in enumerate(rows):
            choice, spec = row.choice, row.spec
            if choice is None or spec is None or cap <= 0 or row.left <= 0:
                out.append(None)
            elif spec.draft == "chain":
                out.append(Plan("chain", min(row.budget, cap)) if row.budget > 0 else None)
            elif spec.draft == "tree":
                out.append(Plan("tree", min(row.depth, row.left), min(spec.tree_nodes, cap), spec.tree_topk))
            else:
                out.append(None)
                auto.append(r)
        if not auto:
            return out, PLAIN, None
        named = any(out)
        specs = [rows[r].spec for r in auto]
        state = rows[auto[0]].state
        assert state is not None
        costs = step_costs(self.engine, state, self.record)  # measured when the row joined (`_choose`)
        longest = min(cap, max(s.max_draft_len for s in specs))
        tree = (max(s.tree_topk for s in specs), min(cap, max(s.tree_nodes for s in specs)),
                max(s.tree_depth for s in specs))  # fmt: skip
        calibration = self.record.calibration
        scale = {kind: calibration.factor(kind) for kind in KINDS}
        self.together_steps += 1
        explore = None
        if self.together_steps % EXPLORE_EVERY == 0 and not named:
            kinds = feasible_kinds(len(auto), longest, tree)
            explore = min(kinds, key=lambda kind: calibration.seconds.get(kind, 0.0))
            explore = explore if calibration.seconds.get(explore, 0.0) < EXPLORE_S else None
        a = self.record.acceptance.vector()
        plan, model_rate = batch_plan(costs, a, len(rows), len(auto), longest, tree, scale, explore)
        if plan is not None:
            for r in auto:
                out[r] = plan.within(rows[r].spec, rows[r].left)
        kind = PLAIN if plan is None else KINDS[("chain", "tree").index(plan.kind) + 1]
        return out, kind, None if named else model_rate

    def _draft_cap(self, rows: int) -> int:
        """The most drafts per row that keep a verification of `rows` rows within the step's token budget."""
        return 1 << 30 if self.max_step_tokens is None else max(0, self.max_step_tokens // rows - 1)

    def drop(self, row: Row) -> None:
        """Take `row` out of the batch; the rows after it move down one slot each. What a drafting row's twig
        achieved goes into the record."""
        before = list(self.active)
        self.active = [r for r in before if r is not row]
        if row.choice is not None:  # what its twig achieved, and how auto's drafter fared alone (`choice.recording`)
            self.record.acceptance.record(row.ranks)
            row.ranks = []
            if row.choice.model_rate is not None:
                self.record.calibration.record(row.choice.kind, row.solo_tokens, row.solo_s, row.choice.model_rate)
                row.solo_tokens, row.solo_s = 0, 0.0
        if not self.active:  # an empty batch holds nothing: the next one reserves what it needs
            self.slots = self.twig_slots = None
        elif self.slots is not None and len(self.active) < len(before):
            _compact(self, before, self.active)

    def _place(self, joined: bool = True) -> None:
        """Slots for every active row (after a join, the newest last, in caches of its own until now): kept while
        they hold the rows' next step, else made anew — twice as many rows when more are needed; each layer as long
        as the row that wants it most, or twice as long as before when it grows (never past what the rows' whole
        answers need) — with every row's caches moved in. A row's next step needs its caches' entries and room past
        them for what a step writes there: a drafting step pads every row to its longest block (`rows.run_rows`), a
        lone drafter writes its whole tree. A row wants room for its next GROW_TOKENS tokens too (within its answer).
        So the slots grow with the tokens the rows hold (`_grow` before a step), not with what they may still write."""
        rows = self.active
        drafting = [_usable(r.spec, r.left, self._draft_cap(1)) for r in rows if r.choice is not None and r.spec]
        room = 2 + max((_writes_past(s) for s in drafting), default=0) + max((_block(s) for s in drafting), default=0)
        slack = 1 << 30
        for which in ("cache", "twig_cache"):
            if which == "twig_cache":  # a drafting step's twig block carries the pending states before the drafts
                room += PENDING_FLUSH
            members = [(i, r) for i, r in enumerate(rows) if which == "cache" or r.choice is not None]
            current = self.slots if which == "cache" else self.twig_slots
            if not members:
                continue
            needs, wants, ceilings = _needs([(getattr(r.state, which), r) for _, r in members], room)
            if current is None or not current.fits(len(rows), needs):
                source = self.engine.adapter.layers if which == "cache" else self.engine.twig.layers
                count, capacities = len(rows), wants
                if current is not None:  # grow: never shrink what the batch already needed (it empties to shrink)
                    count = max(count, 2 * current.rows if count > current.rows else current.rows)
                    layers = zip(needs, wants, current.capacities, ceilings, strict=True)
                    capacities = [_capacity(need, want, c, top) for need, want, c, top in layers]
                current = Slots(self.engine, source, min(count, self.max_rows), capacities)
                members_to_move = members
            else:
                members_to_move = members[-1:] if joined and members[-1][1] is rows[-1] else []
            for i, r in members_to_move:
                current.hold(getattr(r.state, which), i)
            slack = min(slack, *(c - n for n, c in zip(needs, current.capacities, strict=True)))
            if which == "cache":
                self.slots = current
            else:
                self.twig_slots = current
        self._slack, self._written = slack, 0

    def _grow(self) -> None:
        """Before a step: slots that hold every row's next step. Checked in full (`_place` without a newcomer) only
        once the rows may have written the slack of the last check: a layer's entries grow by the tokens a row took
        (a twig's, by the states it caught up: at most PENDING_FLUSH behind)."""
        if self._written + PENDING_FLUSH >= self._slack:
            self._place(joined=False)


def _capacity(need: int, want: int, current: int, ceiling: int) -> int:
    """A layer's length in grown slots: kept while it holds the next step, else twice as long — at least what the
    rows want, at most what their whole answers need."""
    return current if need <= current else max(want, min(2 * current, ceiling))


def _needs(caches: list[tuple[KVCache, Row]], room: int) -> tuple[list[int], list[int], list[int]]:
    """Per layer, over the rows' caches (base or twig): what the next step needs (entries + room), what the slots
    want (+ the next GROW_TOKENS tokens) and the most the whole answers need (+ every token left)."""
    needs, wants, ceilings = [], [], []
    for i in range(len(caches[0][0].layers)):
        held = [(cache[i].length, row.cfg.max_new_tokens - len(row.ids)) for cache, row in caches]
        needs.append(max(n for n, _ in held) + room)
        wants.append(max(n + min(left, GROW_TOKENS) for n, left in held) + room)
        ceilings.append(max(n + left for n, left in held) + room)
    return needs, wants, ceilings


def _usable(spec: SpecConfig, left: int, cap: int) -> SpecConfig:
    """`spec`'s draft sizes as far as a row's steps can use them (what its room in the slots is reserved for): no
    chain longer, and no tree deeper, than the drafts its answer leaves room for (`Row.left`), and no chain longer
    than one row's share of a step's token budget (`_draft_cap`). A request's `draft_len` of 200 on a 20-token
    answer reserves what one of 19 does."""
    deepest = max(1, left)
    chain = max(1, min(spec.max_draft_len, deepest, cap))
    return replace(spec, draft_len=chain, max_draft_len=chain, tree_depth=min(spec.tree_depth, deepest))


def _writes_past(spec: SpecConfig) -> int:
    """The most entries a drafting row's own nodes take past its newest token in one layer in a step: a chain's
    drafts (PENDING_FLUSH of the twig's catching up at least), or, for a row that may draft a tree (by name, or
    auto's), every node a tree runs through layers 1..K — the root, the expanded ones (top-k a level) and the
    kept ones. (A twig's drafting block starts with its pending states: `_place` adds PENDING_FLUSH for the twig's
    caches.)"""
    longest = max(spec.max_draft_len, spec.draft_len, PENDING_FLUSH)
    if spec.draft == "chain":
        return longest
    return max(longest, 1 + spec.tree_topk * (spec.tree_depth - 1) + spec.tree_nodes)


def _block(spec: SpecConfig) -> int:
    """The widest block a drafting row adds to one pass of a step (every row of the pass is padded to it, past its
    own entries so far): a chain's verification (γ + 1), or a tree's level (k nodes), kept nodes or verification
    (N + 1)."""
    chain = max(spec.max_draft_len, spec.draft_len) + 1
    return chain if spec.draft == "chain" else max(chain, spec.tree_topk, spec.tree_nodes + 1)


def generate_batch(
    engine: Engine,
    encoded: list[Encoded],
    configs: list[GenConfig],
    prunes: list[PruneConfig | None],
    specs: list[SpecConfig | None] | None = None,
    record: DraftRecord | None = None,
) -> list[GenerationResult]:
    """Generate for every request, sharing each decode step; results in the requests' order. specs: each request's
    drafting (None: none); record: the twig's `DraftRecord` drafting rows read and add to."""
    specs = specs if specs is not None else [None] * len(encoded)
    session = BatchSession(engine, len(encoded), record)
    rows = [session.add(*request) for request in zip(encoded, configs, prunes, specs, strict=True)]
    while session.active:
        session.step()
        for row in [r for r in session.active if r.reason is not None]:
            session.drop(row)
    return [result(row) for row in rows]


def _compact(session: BatchSession, before: list[Row], after: list[Row]) -> None:
    """Slots 0..len(after)-1 hold `after`'s caches, in order (rows that left give their slots to later ones)."""
    assert session.slots is not None
    where = {id(row): i for i, row in enumerate(before)}
    for dst, row in enumerate(after):
        src = where[id(row)]
        if src != dst:
            assert row.state is not None
            session.slots.hold(row.state.cache, dst)
            if row.choice is not None and session.twig_slots is not None:
                session.twig_slots.hold(row.state.twig_cache, dst)


def result(row: Row) -> GenerationResult:
    """A finished row's result (its text released to the end)."""
    assert row.text is not None and row.reason is not None
    tail = row.text.finish()  # what it held back: into its text, and to the pieces a server still streams
    if tail:
        row.pieces.append(tail)
    assert row.state is not None
    kv = row.state.kv_bytes()
    stats = generation_stats(
        row.encoded, row.ids, row.reason, row.prefill_s, row.decode_s, row.pruned, row.spec_stats, kv
    )
    return GenerationResult(text=row.text.text, token_ids=row.ids, stats=stats)
