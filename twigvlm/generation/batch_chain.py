"""Self-speculative decoding across the rows of a batch: every row drafts a chain, one pass verifies them all.

A step (`chain_step`) runs in levels. Level 0 feeds each row's newest token through base layers 1..K; then, while
any row still drafts, the twig turns the drafting rows' layer-K states into their next draft tokens (a row's first
twig block also carries the states its twig has not seen yet, `Row.pending`: tokens decoded in steps without
drafting), and the drafts go through layers 1..K. A row stops drafting at its own depth, below its confidence
threshold τ, or at a stop token; rows that do not draft (not speculative, or no budget left) take part in level 0
only. One pass over layers K+1..L then verifies every row's [newest token, drafts] — a ragged block, padded at
the end of shorter rows (`rows.run_rows`) — and each row accepts its own prefix (`loop.accept`, the solo rule,
greedy or sampled) and rolls its caches back on its own (`chain.commit_chain`, as a chain drafter does alone).

`draft_len` is the batch's choice (Sequoia's criterion, as `choice.best_drafter` for one row): a verification
of R rows × (γ + 1) tokens costs more as R grows, and drafting stops paying where the products stop being bound by
reading the weights; the step then runs without drafts (`undrafted` in each row's statistics). The cost model
times passes of one row, so it misses what a batch adds (each row's attention, masks, the bookkeeping): each
kind of step's measured tokens per second against the model's (`Calibration`, kept in the twig's `DraftRecord`)
scales its expectation, so the choice follows what the steps measure. A kind with little measured time is
tried now and then (every `EXPLORE_EVERY`-th step) whatever the rates say, so that neither kind's calibration
stays at its prior while the other's is measured.
"""

from __future__ import annotations

import time

import torch

from ..engine import Engine
from ..runtime.sampling import pick_tokens, probs_from_logits
from ..speculative.chain import commit_chain
from ..speculative.choice import Costs
from ..speculative.loop import TreeDraft, accept
from .row import Row
from .rows import Slots, row_positions, run_rows

PLAIN, CHAIN = "batch plain", "batch chain"  # the batch's step kinds in a `Calibration`
PENDING_FLUSH = 8  # a row's twig catches up (`catch_up`) once this many states wait for it
EXPLORE_EVERY = 8  # every so many steps of several rows, a kind measured for less than EXPLORE_S is tried
EXPLORE_S = 2.0


def draft_len(
    costs: Costs,
    a1: float,
    rows: int,
    drafting: int,
    longest: int,
    scale: dict[str, float] | None = None,
    explore: str | None = None,
) -> tuple[int, float]:
    """(γ, the cost model's tokens per second for it): the draft length with the most expected tokens per second
    for a batch of `rows` of which `drafting` may draft (0: no drafting), when the twig's best token is the
    target's with probability a1. A level of drafting runs every row through layers 1..K and the twig, and the
    verification runs rows × (γ + 1) tokens through K+1..L. `scale`: each kind's measured over expected rate
    (`Calibration.factor` of PLAIN and CHAIN), which the choice goes by; `explore`: the kind to take whatever
    the rates say (CHAIN: its best γ), so that both kinds' calibrations are measured."""
    scale = scale or {}
    model = rows / (costs.t_base(rows) + costs.t_verify(rows))
    if explore == PLAIN:
        return 0, model
    best, best_model, best_rate = 0, model, model * scale.get(PLAIN, 1.0)
    for g in range(1, longest + 1 if drafting else 1):
        tokens = rows - drafting + drafting * sum(a1**i for i in range(g + 1))
        model = tokens / (g * costs.t_level(rows) + costs.t_base(rows) + costs.t_verify(rows * (g + 1)))
        if model * scale.get(CHAIN, 1.0) > best_rate or explore == CHAIN and best == 0:
            best, best_model, best_rate = g, model, model * scale.get(CHAIN, 1.0)
    return best, best_model


@torch.inference_mode()
def chain_step(
    engine: Engine, slots: Slots, twig_slots: Slots, rows: list[Row], budgets: list[int]
) -> list[tuple[list[int], int, int]]:
    """One speculative step for the batch `rows` (slots 0..R-1, in order): row r drafts at most budgets[r]
    tokens (0: none; a row without speculation must have 0). Returns per row (its new tokens — the accepted drafts
    and the target's token after them —, drafts made, drafts accepted); caches and positions are committed.
    Every row's statistics get the step's draft and verification times."""
    assert engine.twig is not None
    K, adapter = engine.twig.config.K, engine.adapter
    states = [row.state for row in rows]
    caches = [s.cache for s in states]
    device = caches[0][0].keys().device
    starts = [s.next_position for s in states]
    t0 = time.perf_counter()

    def shallow(tokens: list[int], counts: list[int]) -> torch.Tensor:
        """Layers 1..K on one token per row (rows with count 0 feed padding): layer-K states [R, 1, H]."""
        hidden = adapter.embed(torch.tensor(tokens, device=device).view(-1, 1))
        positions = row_positions(engine, [s.next_position for s in states], 1)
        for s, n in zip(states, counts, strict=True):
            s.next_position += n
        return run_rows(engine, adapter.layers[:K], slots, 0, caches, hidden, positions, counts)

    hs = [[h] for h in shallow([row.next_token for row in rows], [1] * len(rows)).split(1)]  # per row [1, 1, H]
    drafts: list[list[int]] = [[] for _ in rows]
    probs: list[list[torch.Tensor]] = [[] for _ in rows]
    fed = [0] * len(rows)  # tokens of this step (the newest, then drafts) that went through the twig
    drafting = [b > 0 for b in budgets]
    while any(drafting):
        logits = _twig_logits(engine, twig_slots, rows, hs, fed, drafting)
        picked = [0] * len(rows)
        for r, row in enumerate(rows):
            if not drafting[r]:
                continue
            token, confidence = _draft_token(logits[r], row, probs[r])
            drafts[r].append(token)
            picked[r] = token
            done = len(drafts[r]) >= budgets[r] or token in row.eos | row.stop_ids
            drafting[r] = not done and confidence >= row.choice.spec.threshold
        new = shallow(picked, [int(p == len(h)) for p, h in zip(map(len, drafts), hs, strict=True)])
        for r in range(len(rows)):
            if len(drafts[r]) == len(hs[r]):  # drafted this level: its layer-K state
                hs[r].append(new[r : r + 1])
    t1 = time.perf_counter()
    counts = [len(h) for h in hs]
    block = _padded(hs, hs[0][0])  # [R, q, H]
    positions = row_positions(engine, starts, block.shape[1])
    out = run_rows(engine, adapter.layers[K:], slots, K, caches, block, positions, counts)
    wanted = torch.cat([out[r, : counts[r]] for r in range(len(rows))], dim=0).unsqueeze(0)  # [1, Σ counts, H]
    target = engine.logits(wanted)[0].split(counts)  # per row [counts[r], V]
    results = []
    for r, row in enumerate(rows):
        if row.choice is None:  # not speculative: its token as a plain step picks it
            nxt = int(pick_tokens(target[r], row.cfg, row.generator)[0])
            results.append(([nxt], 0, 0))
            continue
        sampled = torch.stack(probs[r]) if probs[r] else None
        draft = TreeDraft.chain(row.next_token, drafts[r], sampled)
        path, nxt = accept(draft, target[r], row.cfg, row.generator)
        accepted = len(path) - 1
        commit_chain(row.state, hs[r], fed[r], accepted, starts[r], row.pending, row.ranks)
        results.append(([drafts[r][i] for i in range(accepted)] + [nxt], len(drafts[r]), accepted))
    t2 = time.perf_counter()
    for row, (_, n, a) in zip(rows, results, strict=True):
        if row.spec_stats is not None and row.choice is not None:
            row.spec_stats.add_step(n, a, t1 - t0, t2 - t1)
    return results


@torch.inference_mode()
def catch_up(engine: Engine, twig_slots: Slots, rows: list[Row]) -> None:
    """The twig on every row's pending layer-K states (their keys and values into its caches; no output needed),
    so that what waits for the twig — and so the block a step writes into its caches — stays short."""
    _run_twig(engine, twig_slots, rows, [row.pending for row in rows])
    for row in rows:
        row.pending = []


def _twig_logits(
    engine: Engine,
    twig_slots: Slots,
    rows: list[Row],
    hs: list[list[torch.Tensor]],
    fed: list[int],
    drafting: list[bool],
) -> list[torch.Tensor | None]:
    """The twig on each drafting row's states it has not seen (its pending ones first, then this step's newest);
    the draft logits [V] at each drafting row's last state (None for the others)."""
    blocks: list[list[torch.Tensor]] = []
    for r, row in enumerate(rows):
        if drafting[r]:
            blocks.append(row.pending + hs[r][fed[r] :])
            fed[r] = len(hs[r])
            row.pending = []
        else:
            blocks.append([])
    out = _run_twig(engine, twig_slots, rows, blocks)
    last = [max(len(b), 1) - 1 for b in blocks]
    head_rows = next(row.state.draft_head for row in rows)  # one twig: the same draft vocabulary for every row
    picked = torch.cat([out[r, last[r] : last[r] + 1] for r in range(len(rows))], dim=0).unsqueeze(0)  # [1, R, H]
    logits = engine.twig_logits(picked, draft=head_rows is not None, rows=head_rows)[0]  # [R, V]
    return [logits[r] if drafting[r] else None for r in range(len(rows))]


def _run_twig(engine: Engine, twig_slots: Slots, rows: list[Row], blocks: list[list[torch.Tensor]]) -> torch.Tensor:
    """The twig layers on each row's block of layer-K states [1, 1, H] — the last ones it was fed, ending at its
    newest — into its twig caches: the output [R, q, H] (rows with no block feed padding)."""
    counts = [len(b) for b in blocks]
    block = _padded(blocks, next(b[0] for b in blocks if b))  # [R, q, H]
    starts = [row.state.next_position - c for row, c in zip(rows, counts, strict=True)]
    positions = row_positions(engine, starts, block.shape[1])
    twig_caches = [row.state.twig_cache for row in rows]
    return run_rows(engine, engine.twig.layers, twig_slots, 0, twig_caches, block, positions, counts)


def _padded(blocks: list[list[torch.Tensor]], pad: torch.Tensor) -> torch.Tensor:
    """Each row's states [1, 1, H] in a row of one block [R, q, H], shorter rows padded at the end with `pad`."""
    q = max(len(b) for b in blocks)
    return torch.cat([torch.cat(b + [pad] * (q - len(b)), dim=1) for b in blocks], dim=0)


def _draft_token(logits: torch.Tensor, row: Row, probs: list[torch.Tensor]) -> tuple[int, float]:
    """A row's next draft from the twig's logits [V] (sampled from q when it samples, q kept in `probs`) and the
    twig's confidence in it — as `TwigChainDrafter.propose` picks it."""
    cfg, threshold = row.cfg, row.choice.spec.threshold
    if cfg.do_sample:
        q = probs_from_logits(logits, cfg)
        token = int(torch.multinomial(q, 1, generator=row.generator))
        probs.append(q)
        return token, float(q[token])
    token = int(logits.argmax())
    return token, float(logits.float().softmax(-1)[token]) if threshold > 0 else 1.0
