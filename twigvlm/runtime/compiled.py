"""Compiled decode steps: each kind of layer call the engine makes while decoding is one program, compiled once
(torch.compile's inductor, ahead of time) and replayed for every layer and every step.

A decode step, a twig draft, a chain verification and a draft tree's verification all call decoder layers on a
few new tokens against a cache. Run eagerly, each layer is dozens of small kernels and Python frames (norms,
RoPE, the cache write, attention, the residuals) around its products. Here one layer call — the stock layer's
own forward, run through the adapter's `call_layer` — is traced once into a fused program and replayed:

- **One program per kind of call, shared by every layer.** The program takes the layer as an input, so all
  layers of one shape (the base's and the twig's alike) share it, and compile time does not grow with depth.
  Kinds: one query or a block of queries, with or without a mask, per batch size, dtype and layer structure.
- **Lengths are data, not shape.** The cache is handed to the program as views of its buffers holding the
  keys/values so far plus room for this block (`LayerKV.window`); their length is a dynamic dimension, as is a
  block's size, so a pruned layer (shorter) runs the same program as a full one, and a 2,000-token generation
  compiles nothing after its first steps. The program writes the block's keys/values into the last slots.
- **No guards at run time.** Programs are compiled ahead of time (`aot_compile`) and called without dynamo's
  guard checks (about a millisecond a step for a few hundred weight tensors): this module picks the program by
  its own key, and the compiled code still asserts every input's shape and strides.
- **The native products inside.** `FastLinear` and `Int8Linear` call the native kernels through the torch ops
  registered here (`twigvlm::gemv`, `twigvlm::panel_int8`) while traced, so a compiled step streams the same
  weights with the same kernels as an eager one.

- **Compiled once per machine.** Each program is saved in the program cache (`program_cache.py`), named by
  everything its code depends on; a later process loads it (about 0.1 s) instead of compiling it again.

A program that fails to compile is reported once and that kind of call stays eager (the generation goes on).
Results equal the eager steps' up to the order of floating-point additions in fused kernels (greedy ids agree;
the oracle tests assert it). What "auto" means — on for CUDA, and on a CPU where compiled decode steps were
measured faster on this machine (cached per CPU, like the kernel plan) — is `compile_probe.py`'s.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import native, program_cache
from .cache import LayerKV
from .sdpa import grouped_heads_with_masks

log = logging.getLogger(__name__)

MAX_BLOCK = 64  # blocks of up to this many queries run compiled (decode, drafts, verification); longer ones eager
_EXAMPLE_Q, _EXAMPLE_K, _EXAMPLE_SLACK = 3, 13, 7  # trace sizes: distinct, > 1, a buffer longer than its window
_BLOCK_Q = 2  # a batched block program's trace: tokens per row (distinct from the rows, _EXAMPLE_Q)


class NATIVE:
    """What a traced product reads (settled before tracing): whether the native kernel is built here, and the row
    count whose measured layout (`KernelPlan`) the program being traced uses."""

    ready = False
    rows = 1


# The kinds of single-row call, as (queries traced with, masked): one query (a decode step, a chain's twig draft),
# a masked query (a draft tree's twig steps) and a masked block (a verification). Only drafting calls the last two.
TOKEN, TREE_STEP, BLOCK = (1, False), (1, True), (_EXAMPLE_Q, True)
KINDS, UNDRAFTED_KINDS = (TOKEN, TREE_STEP, BLOCK), (TOKEN,)

BLOCK_ROWS = 4  # a program for blocks of dynamic size takes the layouts measured for this many rows
ROWS_NATIVE = 8  # the batched program (rows of dynamic count) takes the layouts measured for this many rows


class _Classes:
    """Counts the class swaps of linear layers (`kernels.apply_kernels`, `stock_kernels`, `quant.apply_quantization`
    …): a program traced with one class must never run a layer that now has another, so every swap makes the
    programs' cached layer keys stale."""

    epoch = 0


def classes_changed() -> None:
    """Say that some linear layers changed class (their products, and so the programs they need, changed)."""
    _Classes.epoch += 1


# ---- the native products as torch ops (what a traced FastLinear / Int8Linear calls) ---------------------------
_LIB = torch.library.Library("twigvlm", "DEF")
_LIB.define("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIB.define("panel_int8(Tensor x, Tensor panels, Tensor scale, Tensor? bias) -> Tensor")
_LIB.impl("gemv", lambda x, w, b: step_product(x, w, b), "CPU")
_LIB.impl("panel_int8", lambda x, p, s, b: native.panel_int8(x, p, s, b), "CPU")


@torch.library.register_fake("twigvlm::gemv")
def _gemv_fake(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("twigvlm::panel_int8")
def _panel_int8_fake(x: torch.Tensor, p: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], s.shape[0], dtype=torch.float32)


def step_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`native.gemv`'s bits for x [n, in]: gemv up to 16 rows, its lane-order tiles past them (mostly faster
    there), as layer.c chooses; a program for blocks of dynamic size learns its rows only when it runs, so it
    cannot follow the plan's count at or above as eager steps do (the same bits either way)."""
    if x.shape[0] >= native.LANES_ROWS:
        return native.gemm_lanes(x, weight, bias)
    return native.gemv(x, weight, bias)


def traced_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] · weightᵀ (+ bias) with the native kernel, as a traced graph calls it: [..., out]."""
    d_out, d_in = weight.shape
    out = torch.ops.twigvlm.gemv(x.reshape(-1, d_in).contiguous(), weight, bias)  # [n, out]
    return out.view(*x.shape[:-1], d_out)


def traced_panel_int8(
    x: torch.Tensor, panels: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [..., in] · (q · scale)ᵀ (+ bias), q stored as int8 panels, with the native kernel, as a traced graph
    calls it."""
    d_out, d_in = scale.shape[0], panels.shape[1]
    out = torch.ops.twigvlm.panel_int8(x.reshape(-1, d_in).float().contiguous(), panels, scale, bias)  # [n, out]
    return out.to(x.dtype).view(*x.shape[:-1], d_out)


# ---- the cache as a compiled layer sees it --------------------------------------------------------------------
class WindowKV:
    """The cache protocol a stock attention layer calls, over one layer's window [B, H_kv, length + q, D]: the
    block's keys/values go into the last q slots, and the whole window is what attention reads."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.k, self.v = keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int | None = None, cache_kwargs=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = key_states.shape[2]
        self.k[:, :, -q:].copy_(key_states)
        self.v[:, :, -q:].copy_(value_states)
        return self.k, self.v


class RowsWindowKV:
    """The cache protocol a stock attention layer calls in a batched step (`generation/rows.py`), over one layer's
    windows [R, H_kv, end, D] of the batch's slots: row r's new keys/values go to its slots where[r], and the
    whole window is what attention reads (a mask hides what is not the row's own)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, where: torch.Tensor, rows: torch.Tensor) -> None:
        self.k, self.v, self.where, self.rows = keys, values, where, rows  # where [R, q], rows [R, 1]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int | None = None, cache_kwargs=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[self.rows, :, self.where] = key_states.transpose(1, 2)  # [R, q, H_kv, D] into each row's slots
        self.v[self.rows, :, self.where] = value_states.transpose(1, 2)
        return self.k, self.v


# ---- programs -------------------------------------------------------------------------------------------------
LayerCall = Callable[..., torch.Tensor]  # adapter.call_layer(layer, hidden, mask, position_ids, rope, kv)


@dataclass
class ProgramStats:
    """What the compiled steps did in this process (the bench prints the programs and their compile time)."""

    programs: int = 0  # programs made: compiled, or loaded from the program cache (`loaded` of them)
    compile_s: float = 0.0  # seconds spent making them
    loaded: int = 0  # programs loaded from the program cache (compiled by an earlier process on this machine)
    calls: int = 0  # compiled layer calls
    eager_calls: int = 0  # layer calls that qualified but ran eagerly (a program that failed to compile)
    failures: list[str] = field(default_factory=list)


class StepPrograms:
    """The compiled layer-call programs of one adapter, by kind of call; `run_layer` replays (or compiles) one."""

    def __init__(self, adapter: Any) -> None:
        if adapter.device.type == "cpu":  # (the CPU kernels: not built for a model on a GPU, which never runs them)
            NATIVE.ready = native.gemv_library() is not None
        self.adapter = adapter
        self._call_layer: LayerCall = adapter.call_layer
        self._programs: dict[tuple, Any] = {}
        self._failed: set[tuple] = set()
        self._layer_keys: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
        self._prepared: set[tuple] = set()  # (layer key, kind) pairs whose single-row program was prepared
        self._prepared_rows: set[tuple] = set()  # … and whose batched program was
        self._epoch = _Classes.epoch
        self.stats = ProgramStats()

    def _check_classes(self) -> None:
        """Forget the layer keys taken before a class swap (each layer's key is computed again, from its classes)."""
        if self._epoch != _Classes.epoch:
            self._layer_keys.clear()
            self._prepared.clear()
            self._prepared_rows.clear()
            self._epoch = _Classes.epoch

    @torch.inference_mode()
    def prepare(self, layers: Sequence[nn.Module], kinds: Sequence[tuple[int, bool]] = KINDS) -> None:
        """Compile, now, each of `kinds` (default: all three, `KINDS`) for each structure among `layers` that has
        none yet, batch 1 in the layers' dtype. A generation calls this before its prefill with the kinds it can
        call (one that does not draft: `UNDRAFTED_KINDS`), so no program is ever compiled inside a timed decode step
        (nor inside the drafter's cost probe, whose measurements auto's choices rest on)."""
        self._check_classes()
        for layer in layers:
            layer_key = self._layer_key(layer)
            todo = [kind for kind in kinds if (layer_key, kind) not in self._prepared]
            self._prepared.update((layer_key, kind) for kind in todo)
            missing = [args for q, masked in todo if (args := self._missing(layer, q, masked)) is not None]
            if not missing:  # (made before: a class swap only made them be looked up again)
                continue
            t0, made, loaded = time.perf_counter(), self.stats.programs, self.stats.loaded
            log.info("preparing %d kinds of decode step for %s (compiled once per machine) ...", len(missing),
                     type(layer).__name__)  # fmt: skip
            for args in missing:
                self._compile(*args)
            if self.stats.programs > made:
                seconds = time.perf_counter() - t0
                log.info(program_cache.made_line(self.stats.programs - made, self.stats.loaded - loaded, seconds))

    def _missing(self, layer: nn.Module, q: int, masked: bool) -> tuple | None:
        """What compiling one kind of call for `layer`'s structure takes (`_compile`'s arguments, from stand-in
        inputs of the right kinds: `_examples` sets the lengths it traces with), or None where its program exists
        (or failed before)."""
        hidden, mask, position_ids, rope, keys, values = self._stand_ins(layer, 1, q)
        mask = mask if masked else None
        key = self._program_key(layer, hidden, mask, position_ids)
        if key in self._programs or key in self._failed:
            return None
        return key, layer, hidden, mask, position_ids, rope, keys, values

    @staticmethod
    def takes(q: int, kv: LayerKV | None) -> bool:
        """Whether a block of q queries on this cache runs compiled: a decode-time block (1..MAX_BLOCK queries)
        against keys already cached. Prompts (an empty cache) and layers without a cache run eagerly."""
        return kv is not None and kv.length > 0 and 0 < q <= MAX_BLOCK

    def run_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: LayerKV,
    ) -> torch.Tensor:
        """One layer on hidden [B, q, H] with the cache `kv` extended by the block, compiled: → [B, q, H]."""
        q = hidden.shape[1]
        self._check_classes()
        keys, values = kv.window(q)  # [B, H_kv, length + q, D] each
        key = self._program_key(layer, hidden, mask, position_ids)
        program = self._programs.get(key)
        if program is None and key not in self._failed:
            program = self._compile(key, layer, hidden, mask, position_ids, rope, keys, values)
        if program is None:
            self.stats.eager_calls += 1
            return self._call_layer(layer, hidden, mask, position_ids, rope, kv)
        out = program(layer, hidden, mask, position_ids, rope[0], rope[1], keys, values)
        kv.commit(q)
        self.stats.calls += 1
        return out

    def run_rows_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        windows: tuple[torch.Tensor, torch.Tensor],
        where: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor | None:
        """One layer on q tokens for each of R rows of a batch (hidden [R, q, H], q ≤ MAX_BLOCK; `windows` the
        layer's keys and values [R, H_kv, end, D], row r's new entries going to where[r]; `mask` [R, 1, q, end]),
        compiled: → [R, q, H]; None where the program failed to compile (the caller runs the layer eagerly). Two
        programs: one token per row (a decode step, a chain's draft level) and a block per row (verifications,
        a tree's levels); the row count, the windows' end and a block's size are dynamic, so each serves every
        batch size, length and draft."""
        self._check_classes()
        key = self._rows_key(layer, hidden, position_ids)
        program = self._programs.get(key)
        if program is None and key not in self._failed:
            example = _rows_examples(hidden, mask, position_ids, rope, windows[0], hidden.shape[1] > 1)
            program = self._aot(key, self._rows_fn(), (layer, *example), ROWS_NATIVE)
        if program is None:
            self.stats.eager_calls += 1
            return None
        self.stats.calls += 1
        return program(layer, hidden, mask, position_ids, rope[0], rope[1], *windows, where, rows)

    @torch.inference_mode()
    def prepare_rows(self, layers: Sequence[nn.Module]) -> None:
        """Compile, now, the batched programs (one token per row, and a block per row) for each structure among
        `layers` that has none yet (a batch calls this when it forms, so no program is compiled inside its steps)."""
        self._check_classes()
        for layer in layers:
            layer_key = self._layer_key(layer)
            if layer_key in self._prepared_rows:  # (a batch calls this as each request joins: no work twice)
                continue
            self._prepared_rows.add(layer_key)
            for q in (1, _BLOCK_Q):
                hidden, mask, position_ids, rope, keys, _ = self._stand_ins(layer, 2, q)
                key = self._rows_key(layer, hidden, position_ids)
                if key in self._programs or key in self._failed:
                    continue
                t0, loaded = time.perf_counter(), self.stats.loaded
                example = _rows_examples(hidden, mask, position_ids, rope, keys, q > 1)
                if self._aot(key, self._rows_fn(), (layer, *example), ROWS_NATIVE) is not None:
                    seconds = time.perf_counter() - t0
                    log.info("batch steps: " + program_cache.made_line(1, self.stats.loaded - loaded, seconds))

    def _stand_ins(self, layer: nn.Module, rows: int, q: int) -> tuple:
        """Inputs of the right kinds for a call of `layer` on q tokens in each of `rows` rows: (hidden [rows, q, H],
        an all-true mask [rows, 1, q, q], position ids, the rotary tables, keys and values [rows, H_kv, q, D] of the
        cache's kind)."""
        adapter = self.adapter
        param = next(layer.parameters())
        hidden = torch.zeros((rows, q, adapter.spec.hidden_size), dtype=param.dtype, device=param.device)
        position_ids = torch.cat([adapter.text_positions(_EXAMPLE_K, q)] * rows, dim=-2)  # [(3,) rows, q]
        rope = adapter.rotary(hidden, position_ids)
        keys, values = adapter.project_kv(layer, hidden, rope)
        mask = torch.ones((rows, 1, q, q), dtype=torch.bool, device=param.device)
        return hidden, mask, position_ids, rope, keys, values

    def _rows_key(self, layer: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple:
        """Which batched program a call runs: the layer's structure, one token per row or a block, H, the dtype,
        the device and the position rows (not the row count or the block's size, which are dynamic)."""
        return (self._layer_key(layer), "rows", hidden.shape[1] == 1, hidden.shape[2], hidden.dtype, hidden.device,
                position_ids.dim())  # fmt: skip

    def _rows_fn(self) -> Callable[..., torch.Tensor]:
        call_layer = self._call_layer

        def rows_call(layer, hidden, mask, position_ids, cos, sin, keys, values, where, rows):  # noqa: ANN001, ANN202
            return call_layer(layer, hidden, mask, position_ids, (cos, sin), RowsWindowKV(keys, values, where, rows))

        return rows_call

    def _program_key(
        self, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> tuple:
        """Which program a call runs: the layer's structure, one query or a block, masked or not, (B, H), the
        dtype and the position rows."""
        return (self._layer_key(layer), hidden.shape[1] == 1, mask is not None, tuple(hidden.shape[::2]),
                hidden.dtype, hidden.device, position_ids.dim())  # fmt: skip

    def _layer_key(self, layer: nn.Module) -> tuple:
        """What a program depends on in a layer: its classes (the kernels' among them), its tensors' shapes, dtypes,
        devices and layouts, its kernel plans (traced in: a layout per weight shape) and its modules' constants (a
        sliding window or a scale that differs from layer to layer: `program_cache.layer_constants`)."""
        found = self._layer_keys.get(layer)
        if found is None:
            tensors = [
                (n, tuple(t.shape), t.dtype, t.device, t.is_contiguous())
                for n, t in layer.state_dict(keep_vars=True).items()
            ]
            tensors += [(m.kernel_plan.fingerprint(),) for m in layer.modules() if hasattr(m, "kernel_plan")][:1]
            constants = program_cache.layer_constants(layer)
            found = (tuple(type(m).__name__ for m in layer.modules()), tuple(tensors), constants)
            self._layer_keys[layer] = found
        return found

    def _program_fn(self) -> Callable[..., torch.Tensor]:
        call_layer = self._call_layer

        def layer_call(layer, hidden, mask, position_ids, cos, sin, keys, values):  # noqa: ANN001, ANN202
            return call_layer(layer, hidden, mask, position_ids, (cos, sin), WindowKV(keys, values))

        return layer_call

    def _compile(
        self,
        key: tuple,
        layer: nn.Module,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> Any:
        block = hidden.shape[1] > 1
        example = _examples(hidden, mask, position_ids, rope, keys, values, block)
        return self._aot(key, self._program_fn(), (layer, *example), BLOCK_ROWS if block else 1)

    def _aot(self, key: tuple, fn: Callable[..., torch.Tensor], args: tuple, rows: int) -> Any:
        """The program for `key`: loaded from the program cache where this machine compiled it before, else
        compiled ahead of time on the example `args` (their dynamic dimensions marked), its products traced with
        the layouts measured for `rows` rows, and saved there; None (and the key remembered) when that fails."""
        t0 = time.perf_counter()
        call = f"{self._call_layer.__module__}.{self._call_layer.__qualname__}"  # the adapter's layer call, traced
        name = program_cache.digest((call, key), args[0], rows, args[1].device)
        program = program_cache.load(name, self._call_layer, fn.__globals__)
        if program is None:
            NATIVE.rows = rows
            try:
                with _tracing_config(args[1].device), torch.no_grad():
                    program = torch.compile(fn, fullgraph=True).aot_compile((args, {}))
            except Exception as exc:  # noqa: BLE001 - any compiler failure leaves this kind of call eager
                self._failed.add(key)
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                self.stats.failures.append(reason)
                log.warning("a compiled decode step failed to compile; running it eagerly (%s)", reason)
                return None
            program_cache.save(name, program, self._call_layer)
        else:
            self.stats.loaded += 1
        program.disable_guard_check()
        self._programs[key] = program
        self.stats.programs += 1
        self.stats.compile_s += time.perf_counter() - t0
        return program


def programs_for(adapter: Any) -> StepPrograms:
    """The adapter's compiled programs, made on first use and shared by every VLM and engine on it."""
    programs = getattr(adapter, "_step_programs", None)
    if programs is None:
        programs = adapter._step_programs = StepPrograms(adapter)
    return programs


def _like(t: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    """Zeros of `t`'s kind, its dimension d of sizes[d] where given (a stand-in input to trace with)."""
    shape = [sizes.get(d, n) for d, n in enumerate(t.shape)]
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


def _examples(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    values: torch.Tensor,
    block: bool,
) -> tuple:
    """Stand-in inputs to trace with, their lengths marked dynamic: a window of _EXAMPLE_K keys inside a longer
    buffer (so no relation between a window and its buffer is baked in), and a block of _EXAMPLE_Q queries
    (one for the one-query program, whose block size stays static)."""
    q = _EXAMPLE_Q if block else 1
    k = _EXAMPLE_K + q

    def window(t: torch.Tensor) -> torch.Tensor:
        buf = _like(t, {2: k + _EXAMPLE_SLACK})
        view = buf[:, :, :k]
        torch._dynamo.mark_dynamic(view, 2)
        return view

    h = _like(hidden, {1: q})
    pos = _like(position_ids, {position_ids.dim() - 1: q})
    cos, sin = (_like(r, {r.dim() - 2: q}) for r in rope)
    m = None if mask is None else _like(mask, {2: q, 3: k})
    if block:
        for t, d in ((h, 1), (pos, pos.dim() - 1), (cos, cos.dim() - 2), (sin, sin.dim() - 2)):
            torch._dynamo.mark_dynamic(t, d)
    if m is not None:
        torch._dynamo.mark_dynamic(m, 3)
        if block:
            torch._dynamo.mark_dynamic(m, 2)
    return h, m, pos, cos, sin, window(keys), window(values)


def _rows_examples(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    block: bool = False,
) -> tuple:
    """Stand-in inputs for a batched program, the row count and the windows' end marked dynamic (and a block's
    size, for the block program): _EXAMPLE_Q rows of one token (a block: _BLOCK_Q tokens), windows of _EXAMPLE_K
    keys inside buffers with more rows and entries."""
    r, k, q = _EXAMPLE_Q, _EXAMPLE_K, _BLOCK_Q if block else 1
    pos_row = position_ids.dim() - 2

    def window() -> torch.Tensor:
        buf = _like(keys, {0: r + 2, 2: k + _EXAMPLE_SLACK})
        view = buf[:r, :, :k]
        for d in (0, 2):
            torch._dynamo.mark_dynamic(view, d)
        return view

    h, m = _like(hidden, {0: r, 1: q}), _like(mask, {0: r, 2: q, 3: k})
    pos = _like(position_ids, {pos_row: r, pos_row + 1: q})
    cos, sin = (_like(t, {0: r, 1: q}) for t in rope)
    where = torch.arange(q, device=hidden.device).view(1, q) + torch.arange(r, device=hidden.device).view(r, 1)
    where = where + (k - r - q)  # [R, q]: inside each row's window
    rows = torch.arange(r, device=hidden.device).view(r, 1)  # [R, 1]
    seq = (1,) if block else ()  # the block's size: dynamic in the block program
    dims = ((h, (0, *seq)), (m, (0, 3, *(2,) * block)), (pos, (pos_row, *(pos_row + 1,) * block)),
            (cos, (0, *seq)), (sin, (0, *seq)), (where, (0, *seq)), (rows, (0,)))  # fmt: skip
    for t, ds in dims:
        for d in ds:
            torch._dynamo.mark_dynamic(t, d)
    return h, m, pos, cos, sin, window(), window(), where, rows


@contextlib.contextmanager
def _tracing_config(device: torch.device) -> Any:
    """Symbols for every dynamic length (no "equal at trace time, so equal always"), and on a CPU grouped-query
    attention without copying the cache's heads, as the eager path runs masked blocks (`runtime/sdpa.py`)."""
    from torch.fx.experimental import _config as fx_config

    with grouped_heads_with_masks(device), fx_config.patch(use_duck_shape=False):
        yield
