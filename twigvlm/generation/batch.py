"""Batched decoding: several generations share every decode step, each with its own prompt, pictures, pruning,
positions, sampling and stopping.

Each request is encoded and prefilled on its own — its pruning too (TTP, FastV, VisionZip, CDPruner, DART) —
into a *slot* of caches the batch shares: per layer one buffer [R, H_kv, capacity, D], request r's `LayerKV` a
view of row r (`LayerKV.bind`). A decode step then feeds every unfinished request's next token through each layer
at once, so the products stream each weight once for all rows, with each row's own position ids (1-D, or M-RoPE's
3 rows) and a mask over its own cache length in that layer (pruned layers are shorter, per row). A row that
finishes leaves the batch at once: the last row's caches move into its slot, so the batch stays dense.

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
from .loop import _prefill, check_window
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

    def move(self, cache: KVCache, src: int, dst: int) -> None:
        """Copy the caches held in slot `src` into slot `dst` and rebind `cache` (their owner) there."""
        for i, layer in enumerate(cache.layers):
            n = layer.length
            self.k[i][dst, :, :n] = self.k[i][src, :, :n]
            self.v[i][dst, :, :n] = self.v[i][src, :, :n]
            layer.bind(self.k[i][dst : dst + 1], self.v[i][dst : dst + 1], length=n)


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

    def take(self, token: int) -> None:
        """Add a token and apply the stopping rules (`loop.emit`'s, for one token)."""
        self.ids.append(token)
        if token in self.eos:
            self.reason = "eos"
        elif token in self.stop_ids:
            self.reason = "stop"
        else:
            assert self.text is not None
            self.text.push(token)
            if self.text.stopped:
                self.reason = "stop"
            elif len(self.ids) >= self.cfg.max_new_tokens:
                self.reason = "length"
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


def generate_batch(
    engine: Engine, encoded: list[Encoded], configs: list[GenConfig], prunes: list[PruneConfig | None]
) -> list[GenerationResult]:
    """Generate for every request (no speculation), sharing each decode step; results in the requests' order."""
    adapter = engine.adapter
    rows = [Row(e, c, p) for e, c, p in zip(encoded, configs, prunes, strict=True)]
    for row in rows:
        require_batch_one(row.encoded.inputs_embeds.shape[0], "a batched request")
        check_window(engine, row.encoded, row.cfg)
    capacity = max(row.encoded.num_tokens + row.cfg.max_new_tokens + 1 for row in rows)
    slots = Slots(engine, len(rows), capacity)
    for i, row in enumerate(rows):
        special = {s: adapter.special_token_id(s) for s in row.cfg.stop}
        row.stop_ids = {t for t in special.values() if t is not None}
        row.eos = set() if row.cfg.ignore_eos else set(adapter.eos_token_ids)
        row.text = TextStream(adapter.decode, [s for s, t in special.items() if t is None])
        row.generator = make_generator(row.cfg, row.encoded.inputs_embeds.device)
        row.state = engine.new_state()  # the twig's caches too, where TTP scores with it
        slots.bind(row.state.cache, i)
        t0 = time.perf_counter()
        logits, row.pruned = _prefill(engine, row.state, row.encoded, row.prune, prime_twig=False)
        row.take(int(pick_tokens(logits, row.cfg, row.generator)[0]))
        row.prefill_s = time.perf_counter() - t0
    active = [row for row in rows if row.reason is None]
    _compact(slots, rows, active)
    while active:
        t0 = time.perf_counter()
        logits = batch_step(engine, slots, [row.state for row in active], [row.next_token for row in active])
        for r, row in enumerate(active):
            row.take(int(pick_tokens(logits[r : r + 1], row.cfg, row.generator)[0]))
        seconds = time.perf_counter() - t0
        for row in active:
            row.decode_s += seconds
        still = [row for row in active if row.reason is None]
        if len(still) < len(active):
            _compact(slots, active, still)
        active = still
    return [_result(row) for row in rows]


def _compact(slots: Slots, before: list[Row], after: list[Row]) -> None:
    """Slots 0..len(after)-1 hold `after`'s caches, in order (rows that left give their slots to later ones)."""
    where = {id(row): i for i, row in enumerate(before)}
    for dst, row in enumerate(after):
        src = where[id(row)]
        if src != dst:
            assert row.state is not None
            slots.move(row.state.cache, src, dst)


def _result(row: Row) -> GenerationResult:
    assert row.text is not None and row.reason is not None
    row.text.finish()  # releases what it held back into its text
    stats = generation_stats(row.encoded, row.ids, row.reason, row.prefill_s, row.decode_s, row.pruned, None)
    return GenerationResult(text=row.text.text, token_ids=row.ids, stats=stats)
