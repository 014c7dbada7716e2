"""Batched decoding: several generations share every decode step, each with its own prompt, pictures, pruning,
positions, sampling and stopping.

Each request is encoded and prefilled on its own — its pruning too (TTP, FastV, VisionZip, CDPruner, DART) —
into a *slot* of caches the batch shares: per layer one buffer [R, H_kv, capacity, D], request r's `LayerKV` a
view of row r (`LayerKV.bind`). A decode step then feeds every unfinished request's next token through each layer
at once, so the products stream each weight once for all rows, with each row's own position ids (1-D, or M-RoPE's
3 rows) and a mask over its own cache length in that layer (pruned layers are shorter, per row). A row that
finishes leaves the batch at once and the rows after it move down a slot each, so the batch stays dense.

Each row computes what it would alone — its attention sees exactly its own keys — up to the order of additions
in products over several rows; the tests hold every row to its solo run's greedy ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..adapters.base import Encoded
from ..config import GenConfig, PruneConfig
from ..engine import DecodeState, Engine
from ..errors import require_batch_one
from ..pruning.prefill import PruneStats
from ..runtime.cache import KVCache
from ..runtime.sampling import make_generator, pick_tokens
from .loop import _prefill, check_window, stopping, take_token
from .stats import GenerationResult, generation_stats
from .stream import TextStream


class RowsKV:
    """The cache protocol a stock attention layer calls for a batched one-token step: row r's new keys/values go
    to position lengths[r] of its slot, and attention reads every row's first max(lengths) + 1 slots (a mask
    hides each row's tail)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> None:
        self.k, self.v, self.lengths = keys, values, lengths  # [R, H_kv, cap, D] ×2, [R]
        self.end = int(lengths.max()) + 1

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int | None = None, cache_kwargs=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(key_states.shape[0], device=key_states.device)
        self.k[rows, :, self.lengths] = key_states[:, :, 0]  # [R, H_kv, D] into each row's next slot
        self.v[rows, :, self.lengths] = value_states[:, :, 0]
        return self.k[:, :, : self.end], self.v[:, :, : self.end]


class Slots:
    """Per layer one key and one value buffer [R, H_kv, capacity, D]; row r's caches are views of it."""

    def __init__(self, engine: Engine, rows: int, capacity: int) -> None:
        adapter = engine.adapter
        layers = adapter.layers
        param = next(layers[0].parameters())
        probe = torch.zeros((1, 1, adapter.spec.hidden_size), dtype=param.dtype, device=param.device)
        rope = adapter.rotary(probe, adapter.text_positions(0, 1))
        self.capacity = capacity
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for layer in layers:
            k, _ = adapter.project_kv(layer, probe, rope)  # [1, H_kv, 1, D]: the cache's shape
            shape = (rows, k.shape[1], capacity, k.shape[3])
            self.k.append(k.new_zeros(shape))
            self.v.append(k.new_zeros(shape))

    def bind(self, cache: KVCache, row: int) -> None:
        """Make `cache`'s layers views of slot `row` (empty)."""
        for i, layer in enumerate(cache.layers):
            layer.bind(self.k[i][row : row + 1], self.v[i][row : row + 1])

    def hold(self, cache: KVCache, row: int) -> None:
        """Copy what `cache` holds (another slot's, or another `Slots`'s) into slot `row` and rebind it there."""
        for i, layer in enumerate(cache.layers):
            n = layer.length
            self.k[i][row, :, :n] = layer.keys()[0]
            self.v[i][row, :, :n] = layer.values()[0]
            layer.bind(self.k[i][row : row + 1], self.v[i][row : row + 1], length=n)


@dataclass
class Row:
    """One request of a batch: its inputs, state, stopping rules and what it has produced."""

    encoded: Encoded
    cfg: GenConfig
    prune: PruneConfig | None
    state: DecodeState | None = None
    ids: list[int] = field(default_factory=list)
    next_token: int = 0
    reason: str | None = None
    pruned: PruneStats | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    text: TextStream | None = None
    generator: torch.Generator | None = None
    eos: set[int] = field(default_factory=set)
    stop_ids: set[int] = field(default_factory=set)
    pieces: list[str] = field(default_factory=list)  # text not yet handed on (a server streams and clears it)

    def take(self, token: int) -> None:
        """Add a token under the stopping rules (`loop.take_token`); new text goes to `pieces`."""
        assert self.text is not None
        piece, self.reason = take_token(token, self.ids, self.text, self.cfg.max_new_tokens, self.eos, self.stop_ids)
        if piece:
            self.pieces.append(piece)
        self.next_token = token


@torch.inference_mode()
def batch_step(engine: Engine, slots: Slots, states: list[DecodeState], tokens: list[int]) -> torch.Tensor:
    """One token for each of R rows (their caches in `slots` 0..R-1, in order) through every base layer at once:
    logits [R, V]. Each row's positions advance by one."""
    adapter = engine.adapter
    device = states[0].cache[0].keys().device
    r = len(states)
    hidden = adapter.embed(torch.tensor(tokens, device=device).view(r, 1))  # [R, 1, H]
    positions = torch.cat([adapter.text_positions(s.next_position, 1) for s in states], dim=-2)  # [(3,) R, 1]
    for s in states:
        s.next_position += 1
    rope = adapter.rotary(hidden, positions)
    for i, layer in enumerate(adapter.layers):
        caches = [s.cache[i] for s in states]
        lengths = torch.tensor([c.length for c in caches], device=device)  # [R]
        kv = RowsKV(slots.k[i][:r], slots.v[i][:r], lengths)
        mask = torch.arange(kv.end, device=device).view(1, -1) <= lengths.view(-1, 1)  # [R, end]
        hidden = adapter.call_layer(layer, hidden, mask.view(r, 1, 1, kv.end), positions, rope, kv)
        for c in caches:
            c.length += 1
    return engine.logits(hidden)[:, -1]  # [R, V]


class BatchSession:
    """Requests that share decode steps, joining and leaving at step boundaries: `add` prefills a request into
    the next slot (its first token taken), `step` gives every active row its next token, `drop` takes a row out
    (finished or cancelled; the rows after it move down a slot). The slots grow when a request needs more room
    (every row's caches move into the larger buffers)."""

    def __init__(self, engine: Engine, max_rows: int) -> None:
        self.engine, self.max_rows = engine, max_rows
        self.slots: Slots | None = None
        self.active: list[Row] = []

    @property
    def full(self) -> bool:
        return len(self.active) >= self.max_rows

    def add(self, encoded: Encoded, cfg: GenConfig, prune: PruneConfig | None) -> Row:
        """Prefill one request into the next free slot and take its first token; a row that is already done
        (one token asked for, or an end at once) is not kept."""
        engine, adapter = self.engine, self.engine.adapter
        require_batch_one(encoded.inputs_embeds.shape[0], "a batched request")
        check_window(engine, encoded, cfg)
        assert not self.full, "the batch is full"
        row = Row(encoded, cfg, prune)
        row.eos, row.stop_ids, row.text = stopping(adapter, cfg)
        row.generator = make_generator(cfg, encoded.inputs_embeds.device)
        self._room(encoded.num_tokens + cfg.max_new_tokens + 1)
        assert self.slots is not None
        row.state = engine.new_state()  # the twig's caches too, where TTP scores with it
        self.slots.bind(row.state.cache, len(self.active))
        t0 = time.perf_counter()
        logits, row.pruned = _prefill(engine, row.state, encoded, prune, prime_twig=False)
        row.take(int(pick_tokens(logits, cfg, row.generator)[0]))
        row.prefill_s = time.perf_counter() - t0
        if row.reason is None:
            self.active.append(row)
        return row

    def step(self) -> None:
        """One token for every active row (rows that finish stay until `drop`ped; they take no more tokens)."""
        rows = self.active
        assert all(row.reason is None for row in rows), "drop finished rows before the next step"
        if not rows or self.slots is None:
            return
        t0 = time.perf_counter()
        if len(rows) == 1:  # alone: the engine's own step (compiled where the steps are), on the row's slot views
            state, token = rows[0].state, rows[0].next_token
            assert state is not None
            with torch.inference_mode():
                ids = torch.tensor([[token]], device=state.cache[0].keys().device)
                logits = self.engine.step(state, ids)[:, -1]
        else:
            states, tokens = [row.state for row in rows], [row.next_token for row in rows]
            logits = batch_step(self.engine, self.slots, states, tokens)
        for r, row in enumerate(rows):
            row.take(int(pick_tokens(logits[r : r + 1], row.cfg, row.generator)[0]))
        seconds = time.perf_counter() - t0
        for row in rows:
            row.decode_s += seconds

    def drop(self, row: Row) -> None:
        """Take `row` out of the batch; the rows after it move down one slot each."""
        before = list(self.active)
        self.active = [r for r in before if r is not row]
        if self.slots is not None and len(self.active) < len(before):
            _compact(self.slots, before, self.active)

    def _room(self, needed: int) -> None:
        """Slots of at least `needed` entries per row (allocated, or grown with every active row moved in)."""
        if self.slots is not None and self.slots.capacity >= needed:
            return
        capacity = max(needed, 2 * self.slots.capacity if self.slots is not None else 0)
        grown = Slots(self.engine, self.max_rows, capacity)
        for i, row in enumerate(self.active):
            assert row.state is not None
            grown.hold(row.state.cache, i)
        self.slots = grown


def generate_batch(
    engine: Engine, encoded: list[Encoded], configs: list[GenConfig], prunes: list[PruneConfig | None]
) -> list[GenerationResult]:
    """Generate for every request (no speculation), sharing each decode step; results in the requests' order."""
    session = BatchSession(engine, len(encoded))
    session._room(max(e.num_tokens + c.max_new_tokens + 1 for e, c in zip(encoded, configs, strict=True)))
    rows = [session.add(e, c, p) for e, c, p in zip(encoded, configs, prunes, strict=True)]
    while session.active:
        session.step()
        for row in [r for r in session.active if r.reason is not None]:
            session.drop(row)
    return [result(row) for row in rows]


def _compact(slots: Slots, before: list[Row], after: list[Row]) -> None:
    """Slots 0..len(after)-1 hold `after`'s caches, in order (rows that left give their slots to later ones)."""
    where = {id(row): i for i, row in enumerate(before)}
    for dst, row in enumerate(after):
        src = where[id(row)]
        if src != dst:
            assert row.state is not None
            slots.hold(row.state.cache, dst)


def result(row: Row) -> GenerationResult:
    """A finished row's result (its text released to the end)."""
    assert row.text is not None and row.reason is not None
    tail = row.text.finish()  # what it held back: into its text, and to the pieces a server still streams
    if tail:
        row.pieces.append(tail)
    stats = generation_stats(row.encoded, row.ids, row.reason, row.prefill_s, row.decode_s, row.pruned, None)
    return GenerationResult(text=row.text.text, token_ids=row.ids, stats=stats)
