"""Several generations' caches in shared buffers, and one pass of a block of tokens per row through a range of layers.

`Slots` holds, per layer, one key and one value buffer [R, H_kv, capacity, D]; request r's `LayerKV` is a view of
row r (`LayerKV.bind`), so a pass reads every row's cache as one tensor. `run_rows` feeds hidden [R, q, H] — q
tokens per row, each row with its own positions (1-D, or M-RoPE's 3 rows) — through layers whose caches hold
different lengths per row (pruned layers are shorter, rows are at different points of their answers). Rows may
use fewer than q of the block (`counts`): the rest is padding at the end of the row, computed but never counted
in its caches (its keys are written past the row's length, where the row's next tokens overwrite them), and no
real query sees it (a query sees its row's keys up to itself).

Each row computes what it would alone — its attention sees exactly its own keys — up to the order of additions
in products over several rows. Where the engine runs native layers (`runtime/native_layers.py`), the whole range
is one native call that reads each row's keys in its own slot, up to its own length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..engine import Engine
from ..runtime.cache import KVCache, LayerKV
from ..runtime.compiled import MAX_BLOCK, RowsWindowKV
from ..runtime.sdpa import grouped_heads_with_masks


class Layout:
    """Where a block of q tokens per row goes in caches of the given lengths, and what each query sees: made once
    per distinct set of lengths in a pass (unpruned layers share one). `tails` [R, q, m]: draft trees' masks over
    each row's last m keys once its block is in (every key before them is seen); None: causal."""

    def __init__(self, lengths: Sequence[int], q: int, device: torch.device, tails: torch.Tensor | None = None) -> None:
        held = torch.tensor(lengths, device=device)  # [R]
        self.q, self.end = q, max(lengths) + q
        self.where = held.view(-1, 1) + torch.arange(q, device=device)  # [R, q]: the slot of each new entry
        self.rows = torch.arange(len(lengths), device=device).view(-1, 1)  # [R, 1]
        keys = torch.arange(self.end, device=device).view(1, 1, -1)  # [1, 1, end]
        mask = keys <= self.where.unsqueeze(-1)  # [R, q, end]: its row's keys up to itself
        if tails is not None:  # (a row with fewer than m keys: its tail's first columns fall before them)
            r, _, m = tails.shape
            cols = (held + q).view(-1, 1) + torch.arange(m, device=device)  # [R, m]: each row's last m keys, + m
            wide = torch.cat([mask.new_zeros((r, q, m)), mask], dim=2)  # [R, q, m + end]
            mask = wide.scatter(2, cols.view(r, 1, m).expand(r, q, m), tails.to(device))[:, :, m:].contiguous()
        self.mask = mask.unsqueeze(1)  # [R, 1, q, end]

    @property
    def indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(where, rows): the indices a cache write takes (`RowsWindowKV`)."""
        return self.where, self.rows


def windows(slots: Slots, i: int, rows: int, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's keys and values for the first `rows` slots up to the layout's end: views [R, H_kv, end, D] (the
    cache protocol, `RowsWindowKV`, writes each row's new entries into them and attention reads them whole)."""
    check_room(slots, i, layout.end, layout.q)
    return slots.k[i][:rows, :, : layout.end], slots.v[i][:rows, :, : layout.end]


def check_room(slots: Slots, i: int, end: int, q: int) -> None:
    """Refuse a block of q entries ending at `end` in layer i's slots where it does not fit (checked here: past the
    buffer, a device would only assert, and a native call would refuse with a code)."""
    if end > slots.capacities[i]:
        raise RuntimeError(f"a block of {q} after {end - q} entries does not fit slots of {slots.capacities[i]}")


class Slots:
    """Per layer of `layers` (base or twig) one key and one value buffer [rows, H_kv, capacities[i], D]: each layer
    as long as the batch needs it (pruned layers hold fewer tokens)."""

    def __init__(self, engine: Engine, layers: Sequence[nn.Module], rows: int, capacities: Sequence[int]) -> None:
        adapter = engine.adapter
        param = next(layers[0].parameters())
        probe = torch.zeros((1, 1, adapter.spec.hidden_size), dtype=param.dtype, device=param.device)
        rope = adapter.rotary(probe, adapter.text_positions(0, 1))
        self.rows, self.capacities = rows, list(capacities)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for layer, capacity in zip(layers, self.capacities, strict=True):
            with torch.no_grad():  # (an int8 layer refuses a call that could be trained)
                k, _ = adapter.project_kv(layer, probe, rope)  # [1, H_kv, 1, D]: the cache's shape
            shape = (rows, k.shape[1], capacity, k.shape[3])
            self.k.append(k.new_zeros(shape))
            self.v.append(k.new_zeros(shape))

    def fits(self, rows: int, needs: Sequence[int]) -> bool:
        """Whether `rows` rows of needs[i] entries in layer i fit."""
        return rows <= self.rows and all(n <= c for n, c in zip(needs, self.capacities, strict=True))

    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def hold(self, cache: KVCache, row: int) -> None:
        """Copy what `cache` holds (its own buffers', another slot's, or another `Slots`'s) into slot `row` and bind
        it there."""
        for i, layer in enumerate(cache.layers):
            n = layer.length
            if n:
                self.k[i][row, :, :n] = layer.keys()[0]
                self.v[i][row, :, :n] = layer.values()[0]
            layer.bind(self.k[i][row : row + 1], self.v[i][row : row + 1], length=n)


def row_positions(engine: Engine, starts: Sequence[int], q: int) -> torch.Tensor:
    """Position ids [(3,) R, q] of q tokens per row from each row's start (a row's padding goes on counting)."""
    return torch.cat([engine.adapter.text_positions(s, q) for s in starts], dim=-2)


def run_rows(
    engine: Engine,
    layers: Sequence[nn.Module],
    slots: Slots,
    first: int,
    caches: Sequence[KVCache],
    hidden: torch.Tensor,
    positions: torch.Tensor,
    counts: Sequence[int],
    tails: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden [R, q, H] through `layers`, whose buffers are slots' layers first, first + 1, …; row r is slot r and
    caches[r] its `KVCache` (its layers first, first + 1, … are read and extended). Each row's caches count only
    its first counts[r] tokens (the rest is padding); returns [R, q, H]. tails [R, q, m]: what each query sees
    among its row's last m keys once the block is in (draft trees, `Layout`); None: causal."""
    q = hidden.shape[1]
    rope = engine.adapter.rotary(hidden, positions)
    own_layers: list[list[LayerKV]] = [[c.layers[first + j] for c in caches] for j in range(len(layers))]
    lengths = [tuple(kv.length for kv in own) for own in own_layers]  # per layer, each row's entries before
    packed = engine.native.runs_rows(layers, hidden) if engine.native is not None else None
    if packed is not None:  # the whole range in one native call (`runtime/native_layers.py`)
        for j, held in enumerate(lengths):
            check_room(slots, first + j, max(held) + q, q)
        span = slice(first, first + len(layers))
        hidden = engine.native.run_rows(packed, hidden, rope, slots.k[span], slots.v[span], lengths, tails)
    else:
        hidden = _stock_rows(engine, layers, slots, first, hidden, positions, rope, lengths, tails)
    for own in own_layers:  # each row counts its own tokens, not the block's padding
        for kv, n in zip(own, counts, strict=True):
            kv.length += n
    return hidden


def _stock_rows(
    engine: Engine,
    layers: Sequence[nn.Module],
    slots: Slots,
    first: int,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    lengths: Sequence[tuple[int, ...]],
    tails: torch.Tensor | None,
) -> torch.Tensor:
    """`run_rows` on the stock layers, one layer call at a time (the compiled batched programs, one token or a
    block per row, where compiled steps are on); the caches' lengths are counted by the caller."""
    adapter = engine.adapter
    r, q = hidden.shape[:2]
    programs = engine.programs if q <= MAX_BLOCK else None  # the compiled batched programs
    layouts: dict[tuple[int, ...], Layout] = {}
    with grouped_heads_with_masks(hidden.device):  # every row's call carries a mask
        for j, layer in enumerate(layers):
            layout = layouts.get(lengths[j])
            if layout is None:
                layout = layouts[lengths[j]] = Layout(lengths[j], q, hidden.device, tails)
            kv = windows(slots, first + j, r, layout)
            out = None
            if programs is not None:
                out = programs.run_rows_layer(layer, hidden, layout.mask, positions, rope, kv, *layout.indices)
            if out is None:
                out = adapter.call_layer(
                    layer, hidden, layout.mask, positions, rope, RowsWindowKV(*kv, *layout.indices)
                )
            hidden = out
    return hidden
