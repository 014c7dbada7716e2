"""Which drafter a speculative generation runs: the chain, the tree (and its size), or none at all.

`choose_drafter` resolves `SpecConfig.draft`: "chain" and "tree" run as asked; "auto" does not draft for answers
of a few tokens, and otherwise picks what maximises the expected tokens per second (Sequoia's criterion):

- costs are measured once per `DraftRecord` (a VLM keeps one per twig), device and dtype, on the generation's own
  state right after its prefill
  (`probe_costs`: a verification over n = 1, 2, 4, … 32 rows, a draft level over w nodes, layers 1..K alone; where
  a batch can form, 64, 128 and 256 rows too), and cached on disk for the next process (`cost_cache`);
- the expected tokens per step come from a positional acceptance vector a_r — the chance that the twig's r-th
  best token is the target's — estimated from the twig's steps so far (`Acceptance` in its `DraftRecord`, smoothed
  towards a prior), with Sequoia's dynamic program for the best tree of n nodes and depth d;
- chain (γ ≤ max_draft_len): E = Σ_{i ≤ γ} a_1^i tokens for γ·t_level(1) + t_base(1) + t_verify(γ + 1)
  seconds; tree (N, D, k): E = 1 + the program's value, for t_level(1) + (D − 1)·t_level(k) + t_base(N) +
  t_verify(N + 1);
- each kind's expected rate is then scaled by how its own past choices fared (`Calibration`: the tokens per
  second auto's earlier chains, or trees, measured against what this model expected of them). The passes are
  timed without the step's bookkeeping (a tree's masks, top-k and gathers; a chain's early stop at τ), and the
  program's independent acceptance per level is only an estimate, so the raw model can prefer a tree that
  measures slower than the chain; the measured ratio corrects that after one generation of each kind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from ..config import GenConfig, SpecConfig
from ..engine import DecodeState, Engine
from ..runtime.machine import StealMeter, best_in_rounds, cache_dir
from ..runtime.sampling import Sampler
from ..runtime.thread_governor import GOVERNOR
from . import cost_cache
from .chain import TwigChainDrafter
from .gate import DraftGate
from .stats import SpecStats
from .tree import TwigTreeDrafter

log = logging.getLogger(__name__)

SHORT_ANSWER = 3  # auto does not draft when max_new_tokens is at most this: a verification costs more than it saves
PROBE_ROWS = (1, 2, 4, 8, 16, 32)
WIDE_ROWS = (64, 128, 256)  # probed too where a batch can form (`step_costs(wide=True)`)
PRIOR = (0.6, 0.12, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01)  # a_r before any step is seen
PRIOR_WEIGHT = 8.0  # in node visits
CALIBRATION_PRIOR_S = 1.0  # seconds of "as expected" a kind's calibration starts from


@dataclass
class Costs:
    """Seconds per pass, by rows: verify (layers K+1..L + head), level (layers 1..K + twig + twig head), base
    (layers 1..K alone). Between measured row counts, linear."""

    verify: dict[int, float]
    level: dict[int, float]
    base: dict[int, float]

    @staticmethod
    def _at(table: dict[int, float], n: int) -> float:
        keys = sorted(table)
        lo = max([k for k in keys if k <= n], default=keys[0])
        hi = min([k for k in keys if k >= n], default=keys[-1])
        if lo == hi:
            return table[lo] * (n / lo if n > lo else 1.0)
        return table[lo] + (table[hi] - table[lo]) * (n - lo) / (hi - lo)

    def t_verify(self, n: int) -> float:
        return self._at(self.verify, n)

    def t_level(self, w: int) -> float:
        return self._at(self.level, w)

    def t_base(self, n: int) -> float:
        return self._at(self.base, n) if n > 0 else 0.0


@dataclass
class Acceptance:
    """How often the target took the twig's r-th best token at a node the step reached (any rank, or none)."""

    hits: list[float] = field(default_factory=lambda: [0.0] * len(PRIOR))
    visits: float = 0.0

    def vector(self) -> tuple[float, ...]:
        """a_r, smoothed towards PRIOR, rounded (so the dynamic program's cache is hit)."""
        w = PRIOR_WEIGHT
        return tuple(round((h + p * w) / (self.visits + w), 3) for h, p in zip(self.hits, PRIOR, strict=True))

    def record(self, ranks: list[int | None]) -> None:
        """One node visit per entry: the accepted child's rank (0-based), or None when none was accepted."""
        for r in ranks:
            self.visits += 1
            if r is not None and r < len(self.hits):
                self.hits[r] += 1


@dataclass
class Calibration:
    """Per drafter kind, auto's past choices: the seconds their steps took, and the seconds the cost model
    expected for the tokens they produced (tokens / expected rate)."""

    seconds: dict[str, float] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)

    def factor(self, kind: str) -> float:
        """Measured over expected tokens per second for `kind`, smoothed towards 1 (1 before any step)."""
        c = CALIBRATION_PRIOR_S
        return (self.expected.get(kind, 0.0) + c) / (self.seconds.get(kind, 0.0) + c)

    def record(self, kind: str, tokens: int, seconds: float, expected_rate: float) -> None:
        if tokens <= 0 or seconds <= 0 or expected_rate <= 0:
            return
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.expected[kind] = self.expected.get(kind, 0.0) + tokens / expected_rate


@dataclass
class DraftRecord:
    """What auto has learned about one twig, read by its next choices: the passes' costs (per device and dtype),
    the twig's acceptance by rank, and each kind's calibration. Its owner passes it in (`VLM` keeps one per twig,
    `VLM.draft_record`); a generation without one starts from a fresh record, so no choice depends on hidden
    process state (a fresh record's costs come from the machine's cache where an earlier process measured them:
    `cost_cache`)."""

    costs: dict[tuple, Costs] = field(default_factory=dict)  # by (device, dtype, products, compiled steps)
    acceptance: Acceptance = field(default_factory=Acceptance)
    calibration: Calibration = field(default_factory=Calibration)


@dataclass(frozen=True)
class DrafterChoice:
    kind: str  # "chain", "tree" or "none"
    spec: SpecConfig  # the settings it runs with (auto: the chosen γ, or N and D, in draft_len or tree_nodes/depth)
    expected_rate: float | None = None  # tokens per second auto expects (the cost model's, calibrated; auto only)
    model_rate: float | None = None  # the cost model's own expectation, before calibration


def choose_drafter(
    engine: Engine, state: DecodeState, cfg: GenConfig, spec: SpecConfig, rec: DraftRecord
) -> DrafterChoice:
    """The drafter for one generation (after its prefill: `state` holds the prompt), from what `rec` holds."""
    if spec.draft == "chain":
        return DrafterChoice("chain", spec)
    if spec.draft == "tree":
        return DrafterChoice("tree", spec)
    if cfg.max_new_tokens <= SHORT_ANSWER:
        return DrafterChoice("none", spec)
    scale = {kind: rec.calibration.factor(kind) for kind in ("chain", "tree")}
    return best_drafter(step_costs(engine, state, rec), rec.acceptance.vector(), spec, scale)


def make_drafter(
    engine: Engine, state: DecodeState, cfg: GenConfig, generator: Sampler | None, choice: DrafterChoice
) -> TwigChainDrafter | TwigTreeDrafter:
    """The drafter a choice of "chain" or "tree" runs with its settings, on this generation's state."""
    s = choice.spec
    if choice.kind == "tree":
        return TwigTreeDrafter(engine, state, cfg, s.tree_topk, s.tree_nodes, generator)
    return TwigChainDrafter(engine, state, cfg, generator, s.threshold)


def draft_gate(engine: Engine, state: DecodeState, spec: SpecConfig, rec: DraftRecord) -> DraftGate | None:
    """auto's `DraftGate` for one generation (its plain rate from the costs `rec` holds); None for a drafter the
    request named, which drafts every step, or with TWIGVLM_DRAFT_GATE=0 (for measurements that want every step
    drafted)."""
    if spec.draft != "auto" or os.environ.get("TWIGVLM_DRAFT_GATE", "1") == "0":
        return None
    costs = step_costs(engine, state, rec)  # (measured when auto chose: read, not measured again)
    return DraftGate(costs.t_base(1) + costs.t_verify(1))


def draft_depth(choice: DrafterChoice) -> tuple[int, int | None]:
    """(the depth a choice of "chain" or "tree" drafts to — a chain's γ, a tree's D —, the cap of an adaptive γ,
    None where the depth stays)."""
    s = choice.spec
    if choice.kind == "tree":
        return s.tree_depth, None
    return s.draft_len, (s.max_draft_len if s.adaptive else None)


def step_costs(engine: Engine, state: DecodeState, rec: DraftRecord, wide: bool = False) -> Costs:
    """The passes' costs for this engine from `rec`, probed on `state` (`probe_costs`) the first time. They differ
    by device, dtype, the products (the LM head's class: stock, fast kernels or int8), whether the steps run
    compiled (`runtime/compiled.py`) and whether the layers run natively (`runtime/native_layers.py`). `wide`:
    with the passes of WIDE_ROWS rows too (a batch's verifications, rows × drafted tokens, go past PROBE_ROWS:
    measured once, where a batch can form, instead of extrapolated)."""
    keys = state.cache[0].keys()
    key = (
        str(keys.device),
        str(keys.dtype),
        type(engine.adapter.lm_head).__name__,
        engine.programs is not None,
        engine.native is not None,
    )
    name = None
    if key not in rec.costs:
        name = cost_cache.disk_key(engine, state, key)
        tables = cost_cache.load(name)
        if tables is None:
            reductions = GOVERNOR.reductions
            with _probing(
                "auto's drafter: measuring this model's draft and verification passes on this machine"
            ) as steal:
                tables = _tables(probe_costs(engine, state))
            _keep(name, tables, reductions, steal)
        rec.costs[key] = Costs(*tables)
    costs = rec.costs[key]
    if wide and max(costs.verify) < WIDE_ROWS[-1]:
        reductions = GOVERNOR.reductions
        with _probing(f"auto's drafter: measuring batch verifications of up to {WIDE_ROWS[-1]} rows") as steal:
            more = probe_costs(engine, state, 1, WIDE_ROWS)  # (long passes: one run each is steady)
        tables = [_monotone({**a, **b}) for a, b in zip(_tables(costs), _tables(more), strict=True)]
        costs = rec.costs[key] = Costs(*tables)
        _keep(name or cost_cache.disk_key(engine, state, key), _tables(costs), reductions, steal)
    return costs


def _keep(name: str, tables: tuple, reductions: int, steal: StealMeter) -> None:
    """Cache measured tables for later processes, unless the machine was busy meanwhile (the native layers' thread
    governor shrank their team): such costs serve this process only. Measured while the host took the cores
    (steal, which the governor cannot see), they are cached for the next processes to measure again."""
    if not (GOVERNOR.reductions == reductions and GOVERNOR.calm()):
        log.info("... for this process only: other work took this machine's cores meanwhile")
        return
    if cost_cache.store(name, tables, steal):  # (under steal, the store says it is measured again)
        log.info("... kept for later processes (in %s)", cache_dir())


_spent = threading.local()  # this thread's seconds in probes (`probe_seconds`)


def probe_seconds() -> float:
    """The seconds this thread has spent in auto's cost probes so far: a generation's `probe_s` is the difference
    across its drafter choice (per thread, so generations on other threads do not count)."""
    return getattr(_spent, "seconds", 0.0)


@contextlib.contextmanager
def _probing(what: str) -> Iterator[StealMeter]:
    """Time a probe into this thread's `probe_seconds`, saying what it is (the CLI shows twigvlm's INFO lines) and
    how long it took; yields the steal it met (read when the block ends)."""
    log.info("%s ...", what)
    t0 = time.perf_counter()
    try:
        with StealMeter() as steal:
            yield steal
    finally:
        seconds = time.perf_counter() - t0
        _spent.seconds = probe_seconds() + seconds
        log.info("... measured in %.1f s", seconds)


def _tables(costs: Costs) -> tuple[dict[int, float], dict[int, float], dict[int, float]]:
    return costs.verify, costs.level, costs.base


def best_drafter(
    costs: Costs, a: tuple[float, ...], spec: SpecConfig, scale: dict[str, float] | None = None
) -> DrafterChoice:
    """The chain or tree with the most expected tokens per second under these costs and acceptance vector, each
    kind's rate times its `scale` (a `Calibration` factor; 1 where missing). Never none: auto leaves out drafting
    only for short answers, so that a twig's acceptance keeps being measured."""
    scale = scale or {}
    options = []
    for g in range(1, spec.max_draft_len + 1):
        e = sum(a[0] ** i for i in range(g + 1))
        rate = e / (g * costs.t_level(1) + costs.t_base(1) + costs.t_verify(g + 1))
        options.append(DrafterChoice("chain", replace(spec, draft_len=g), rate * scale.get("chain", 1.0), rate))
    k = spec.tree_topk
    ranks = tuple(a[:k]) + (0.0,) * max(0, k - len(a))
    for d in range(1, spec.tree_depth + 1):
        draft = costs.t_level(1) + (d - 1) * costs.t_level(k)
        for n in range(1, spec.tree_nodes + 1):
            e = 1 + best_tree_value(ranks, n + 1, d)
            rate = e / (draft + costs.t_base(n) + costs.t_verify(n + 1))
            tree_spec = replace(spec, tree_nodes=n, tree_depth=d)
            options.append(DrafterChoice("tree", tree_spec, rate * scale.get("tree", 1.0), rate))
    return max(options, key=lambda o: o.expected_rate)


@functools.lru_cache(maxsize=256)
def best_tree_value(a: tuple[float, ...], n: int, d: int) -> float:
    """Sequoia's program: the most expected accepted nodes of a tree of n nodes (its root included, not counted)
    and depth at most d, when the r-th child of a reached node is accepted with probability a[r]."""
    if n <= 1 or d == 0:
        return 0.0
    best = [0.0] * n  # best[m]: the most value from m nodes spread over ranks r.. (ranks r+1.. done before)
    for r in reversed(range(len(a))):
        best = [
            max(best[m], *(a[r] * (1 + best_tree_value(a, j, d - 1)) + best[m - j] for j in range(1, m + 1)))
            if m
            else 0.0
            for m in range(n)
        ]
    return best[n - 1]


@torch.inference_mode()
def probe_costs(engine: Engine, state: DecodeState, repeats: int = 3, sizes: tuple[int, ...] = PROBE_ROWS) -> Costs:
    """Time the passes a step is made of on this state, over each of `sizes` rows (its caches are left as they were):
    the best of `repeats`, taken in rounds (`best_in_rounds`)."""
    assert engine.twig is not None and state.twig_cache is not None
    K, L, adapter = engine.twig.config.K, engine.num_layers, engine.adapter
    device = state.cache[0].keys().device
    lengths, twig_lengths = state.cache.lengths(), state.twig_cache.lengths()
    rows = state.draft_head

    def run(part: str, n: int) -> None:
        hidden = adapter.embed(torch.zeros((1, n), dtype=torch.long, device=device))  # [1, n, H]
        pos = adapter.text_positions(state.next_position, n)
        if part == "verify":
            engine.logits(engine.forward(state, hidden, pos, K, L))
            return
        hidden = engine.forward(state, hidden, pos, 0, K)
        if part == "level":
            engine.twig_logits(engine.forward_twig(state, hidden, pos), draft=rows is not None, rows=rows)

    def timed(key: tuple[str, int]) -> float:
        t = time.perf_counter()
        run(*key)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t
        for kv, m in zip(state.cache.layers, lengths, strict=True):
            kv.crop(m)
        for kv, m in zip(state.twig_cache.layers, twig_lengths, strict=True):
            kv.crop(m)
        return seconds

    parts = ("verify", "level", "base")
    best = best_in_rounds(timed, [(part, n) for part in parts for n in sizes], repeats)
    tables = {part: _monotone({n: best[part, n] for n in sizes}) for part in parts}
    return Costs(tables["verify"], tables["level"], tables["base"])


def _monotone(table: dict[int, float]) -> dict[int, float]:
    """A pass never gets cheaper with more rows: a time above a later one is noise (a busy machine), so each
    entry becomes the least time measured at its row count or above."""
    out, low = {}, math.inf
    for n in sorted(table, reverse=True):
        low = min(low, table[n])
        out[n] = low
    return dict(sorted(out.items()))


def recording(
    blocks: Iterator[list[int]],
    rec: DraftRecord,
    ranks: Callable[[], list[int | None]],
    choice: DrafterChoice | None = None,
    stats: SpecStats | None = None,
) -> Iterator[list[int]]:
    """`blocks`, and when the generation ends (or is dropped), the ranks it saw go into the twig's acceptance
    record `rec` and, for auto's choices, the tokens and seconds of its steps into the kind's calibration."""
    try:
        yield from blocks
    finally:
        rec.acceptance.record(ranks())
        if choice is not None and choice.model_rate is not None and stats is not None:
            seconds = stats.draft_s + stats.verify_s
            rec.calibration.record(choice.kind, stats.emitted, seconds, choice.model_rate)
