"""Fast linear products for the decoder on CPU: the layout of `x · Wᵀ` chosen per machine and per row count.

On CPUs, `nn.Linear` (`F.linear`, MKL's `x · Wᵀ`) over the few rows that decoding and verification run is often
far below what memory allows: those products are bound by reading the weights. `FastLinear` is an `nn.Linear`
subclass — the same parameters, the same `state_dict`, the checkpoint untouched — whose forward picks, by the
number of rows, the layout a short probe measured fastest on this machine for this weight shape:

- "linear": `F.linear` (what nn.Linear runs);
- "wxt": the same product written as `(W · xᵀ)ᵀ` (another BLAS path);
- "gemv": twigvlm's native kernel (`twigvlm.runtime.native`, built at first use with the machine's C compiler), which
  streams each weight row once for all rows of x;
- "gemm": its many-row kernel (weights copied into panels, a block of the result held in registers), tried from
  BLOCK_ROWS rows on, where products are bound by arithmetic.

The probe times every layout over all the model's weights of a shape (so weights stream from memory as in a
decode step; from BLOCK_ROWS rows on, where a product is bound by arithmetic, over less of them), in rounds,
and takes an alternative only where it wins clearly, for the row counts of decoding and verification (up to 64)
and of prompts (128, 256, 512: a prefill; beyond them nn.Linear, or "gemm" where it won at 512 rows: a row's
result from it does not depend on the rows beside it, so a batch's prefill gives each request what it gets
alone); the plan is cached on disk per CPU, thread count, dtype, shapes, kernel build and probed row counts.
Products that need gradients (twig training) always run `F.linear`; the native kernels take fp32 and bf16 weights.

The plan's choice per row count holds inside a pass over whole sequences (`bulk_products`: a prompt's prefill,
training's passes without gradient, scoring). Outside it — decoding, drafting, verification, a batch's step — a
weight whose one-row layout is "gemv" keeps gemv's order of additions at every row count, so a token's logits in
a tree's verification or in a batch of 8 × 5 rows are those of its one-row decode step, and speculation and
batching stay lossless (BLAS and "gemm" sum in other orders): "gemv" up to BLOCK_ROWS rows and where the plan
has it, elsewhere "lanes" — `native.gemm_lanes`, gemm's tiles summing in gemv's order, within 0-20% of "gemm"
(the demo's LM head over 104 rows on AVX2: 44.5 ms against gemm's 39.7 and gemv's 53.6; over 17-31 rows, where
gemv runs a short chunk of rows, 1.2-1.4× faster than gemv).

`apply_kernels(modules, "auto")` turns the `nn.Linear`s of the given modules into `FastLinear`s in place (a class
change: no tensor is copied, so memory is unchanged); `"stock"` turns them back. ("products" does what "auto" does
here; the two differ one floor up, where "auto" also runs whole ranges of decoder layers natively:
`native_layers.py`.) `stock_kernels(...)` does that
for the length of a `with` block (the bench's `hf` baseline runs on the untouched classes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import KERNEL_MODES
from ..errors import TwigVLMError
from . import compiled, native
from .machine import StealMeter, best_in_rounds, cache_dir, measurement_key, read_cached, write_cached

log = logging.getLogger(__name__)

PROBE_ROWS = (1, 2, 4, 6, 8, 12, 16, 32, 64)  # row counts the probe measures; others use the nearest below
PROMPT_ROWS = (128, 256, 512)  # a prompt's rows (a prefill): nn.Linear against the native kernel; more: nn.Linear
PROBE_BYTES = 64 * 2**20  # per shape, time at most this much weight (all of a shape's weights when smaller)
BLOCK_ROWS = 16  # from this many rows on, a product is bound by arithmetic, not by streaming its weights …
BLOCK_BYTES = 16 * 2**20  # … so less weight shows the same: this much, for row counts up to PROBE_ROWS[-1]
PROMPT_BYTES = 4 * 2**20  # … and this much for prompt-sized row counts
WIN = 0.9  # an alternative layout is taken where it needs at most this share of nn.Linear's time
LAYOUTS = ("linear", "wxt", "gemv", "gemm")  # F.linear; (W · xᵀ)ᵀ; the native kernels (few rows, many rows)
# (and "lanes", never probed: a step's many-row products where one row runs "gemv" — `KernelPlan.layout`)
_BULK: ContextVar[bool] = ContextVar("twigvlm_bulk_products", default=False)


@contextlib.contextmanager
def bulk_products() -> Iterator[None]:
    """Inside the block — a pass over whole sequences: a prompt's prefill, training's passes without gradient —
    every product takes the layout measured fastest for its row count; outside it, a step's products keep one-row
    decoding's bits at every row count (see the module)."""
    token = _BULK.set(True)
    try:
        yield
    finally:
        _BULK.reset(token)


@dataclass
class KernelPlan:
    """Per weight shape (out, in): the layout for each probed row count."""

    layouts: dict[tuple[int, int], dict[int, str]]
    probe_s: float = 0.0
    cached: bool = False
    _memo: dict[tuple[tuple[int, int], int, bool], str] = field(default_factory=dict, repr=False, compare=False)

    def layout(self, shape: tuple[int, int], rows: int, bulk: bool = True) -> str:
        """The layout for `rows` rows of a weight of `shape`: the measured one in a pass over whole sequences
        (`bulk`); in a step (not `bulk`) where one row runs "gemv", gemv's bits at every row count: "gemv" below
        native.LANES_ROWS rows, from there "lanes" unless "gemv" won at the nearest probed count at or above (gemv runs
        rows in chunks of 8: the count below, 16, where they fit, says little of 17-31)."""
        key = (shape, rows, bulk)
        found = self._memo.get(key)
        if found is None:
            table = self.layouts.get(shape)
            probed = [r for r in table if r <= rows] if table else []
            last = max(table) if table else 0
            found = table[max(probed)] if probed and (rows <= last or table[last] == "gemm") else "linear"
            if table and not bulk and table[min(table)] == "gemv":
                above = [r for r in table if r >= rows]
                nearest = table[min(above)] if above else found
                found = "gemv" if rows < native.LANES_ROWS or nearest == "gemv" else "lanes"
            self._memo[key] = found
        return found

    def fingerprint(self) -> str:
        """The layouts as one string: what a program traced with this plan depends on (`runtime/compiled.py`)."""
        return repr(sorted((shape, sorted(table.items())) for shape, table in self.layouts.items()))

    def summary(self) -> dict[str, dict[str, list[int]]]:
        """Per shape, the probed row counts each layout runs at (for stats and logs)."""
        out: dict[str, dict[str, list[int]]] = {}
        for (o, i), table in self.layouts.items():
            rows = out.setdefault(f"{o}x{i}", {})
            for r, layout in sorted(table.items()):
                rows.setdefault(layout, []).append(r)
        return out


class FastLinear(nn.Linear):
    """`nn.Linear` whose forward follows a `KernelPlan` (set as `kernel_plan` when the class is swapped in)."""

    kernel_plan: KernelPlan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced(x)
        # the hot path of every decode step: a few attribute reads, one dict look-up, then the product
        if x.dim() < 2:
            return F.linear(x, self.weight, self.bias)
        d_in, d_out = self.in_features, self.out_features
        rows = x.numel() // d_in
        layout = self.kernel_plan.layout((d_out, d_in), rows, _BULK.get())
        if layout == "linear" or rows == 0:
            return F.linear(x, self.weight, self.bias)
        weight, bias = self.weight, self.bias
        flat = x.reshape(rows, d_in)  # [n, in]
        if layout == "gemv" and native.takes(flat, weight, bias):
            out = native.gemv(flat, weight, bias)  # [n, out]
        elif layout == "lanes" and native.takes(flat, weight, bias):
            out = native.gemm_lanes(flat, weight, bias)  # [n, out], gemv's bits
        elif layout == "gemm" and native.takes(flat, weight, bias):
            out = native.gemm(flat, weight, bias)  # [n, out]
        else:
            out = torch.mm(weight, flat.t()).t()  # [out, in] · [in, n] → [n, out]
            if bias is not None:
                out = out + bias
        return out.reshape(*x.shape[:-1], d_out) if x.dim() > 2 else out

    def _traced(self, x: torch.Tensor) -> torch.Tensor:
        """The product as a compiled step traces it (`runtime/compiled.py`): the plan's layout for the program's
        rows (one query, or a block of dynamic size: the layout measured for BLOCK_ROWS rows; a step's, as
        eagerly), the native kernel through its torch op."""
        shape = (self.out_features, self.in_features)
        layout = self.kernel_plan.layout(shape, compiled.NATIVE.rows, bulk=False)
        weight = self.weight
        native_ok = (
            compiled.NATIVE.ready
            and x.dtype is weight.dtype
            and x.dtype in native.WEIGHT_DTYPES
            and weight.device.type == "cpu"
            and weight.is_contiguous()
            and (self.bias is None or self.bias.is_contiguous())
        )  # what `native.takes` checks eagerly; the program's key holds these facts of every layer it runs
        if layout in ("gemv", "lanes") and native_ok:  # (gemv's bits at any rows: `compiled.step_product`)
            return compiled.traced_gemv(x, self.weight, self.bias)
        if layout == "wxt":
            out = torch.mm(self.weight, x.reshape(-1, self.in_features).t()).t()  # [n, out]
            out = out if self.bias is None else out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def linears(modules: Iterable[nn.Module]) -> list[nn.Linear]:
    """Every nn.Linear (or FastLinear) inside `modules`, each once."""
    seen: dict[int, nn.Linear] = {}
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, nn.Linear):
                seen.setdefault(id(sub), sub)
    return list(seen.values())


def resolve_mode(mode: str | None) -> str:
    """The kernel mode asked for, else the environment's TWIGVLM_KERNELS, else auto."""
    return check_mode(mode or os.environ.get("TWIGVLM_KERNELS") or "auto")


def check_mode(mode: str) -> str:
    if mode not in KERNEL_MODES:
        raise TwigVLMError(f"kernels {mode!r} is unknown: use one of {', '.join(KERNEL_MODES)}")
    return mode


def apply_kernels(
    modules: Iterable[nn.Module], mode: str = "auto", plan: KernelPlan | None = None
) -> KernelPlan | None:
    """Swap the nn.Linear classes inside `modules` to FastLinear (auto or products, CPU only) or back (stock).
    Returns the plan used (probed or read from the cache when not given), None for stock or a non-CPU model."""
    check_mode(mode)
    found = linears(modules)
    compiled.classes_changed()
    if mode == "stock" or not found or found[0].weight.device.type != "cpu":
        for lin in found:
            if type(lin) is FastLinear:
                lin.__class__ = nn.Linear
                lin.__dict__.pop("kernel_plan", None)  # a plain layer again: compiled steps' keys must not see a plan
        return None
    plan = plan or cached_plan(found)
    for lin in found:
        if type(lin) in (nn.Linear, FastLinear):
            lin.__class__ = FastLinear
            lin.kernel_plan = plan
    return plan


@contextlib.contextmanager
def stock_kernels(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside the block, the FastLinears (and their subclasses: int8 layers) in `modules` are plain nn.Linear
    again — the untouched model; each gets its own class back after."""
    ours = [(lin, type(lin)) for lin in linears(modules) if isinstance(lin, FastLinear)]
    for lin, _ in ours:
        lin.__class__ = nn.Linear
    compiled.classes_changed()
    try:
        yield
    finally:
        for lin, cls in ours:
            lin.__class__ = cls
        compiled.classes_changed()


# ---- the probe ------------------------------------------------------------------------------------------------
def _pass_ms(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def _candidates(weights: list[torch.Tensor], x: torch.Tensor, wxt: bool = True) -> dict[str, Callable[[], None]]:
    """One pass over `weights` with x for each layout available here (without "wxt" when not `wxt`)."""

    def linear() -> None:
        for w in weights:
            F.linear(x, w)

    def transposed() -> None:
        for w in weights:
            torch.mm(w, x.t())

    def gemv() -> None:
        for w in weights:
            native.gemv(x, w)

    def gemm() -> None:
        for w in weights:
            native.gemm(x, w)

    out = {"linear": linear, "wxt": transposed} if wxt else {"linear": linear}
    if x.dtype in native.WEIGHT_DTYPES and native.gemv_library() is not None:
        out["gemv"] = gemv
        if x.shape[0] >= BLOCK_ROWS:
            out["gemm"] = gemm
    return out


@torch.inference_mode()
def probe(found: list[nn.Linear], rows: Iterable[int] = PROBE_ROWS + PROMPT_ROWS, repeats: int = 3) -> KernelPlan:
    """Time every layout over the weights of each shape (up to PROBE_BYTES of them), the fastest of repeats + 1
    passes each taken in rounds (`best_in_rounds`: every layout once, then again), for each row count; an
    alternative wins where it needs at most WIN of the stock time. Past PROBE_ROWS (a prompt's rows) only the
    native kernels are tried, on up to PROMPT_BYTES of weights and in at most three rounds: those products are
    bound by arithmetic, where MKL's blocked product is strong, and on some CPUs the native kernels still beat
    it (a demo prefill in fp32: 230 → 171 ms on gemv's tiles)."""
    t0 = time.perf_counter()
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for lin in found:
        same = by_shape.setdefault((lin.out_features, lin.in_features), [])
        if not same or (len(same) + 1) * lin.weight.numel() * lin.weight.element_size() <= PROBE_BYTES:
            same.append(lin.weight.detach().contiguous())  # enough weights to stream from memory, not too many
    layouts: dict[tuple[int, int], dict[int, str]] = {}
    for shape, weights in by_shape.items():
        table = {}
        for n in rows:
            prompt = n > PROBE_ROWS[-1]
            ws = _first_bytes(weights, PROMPT_BYTES if prompt else BLOCK_BYTES if n >= BLOCK_ROWS else PROBE_BYTES)
            passes = _candidates(ws, torch.randn(n, shape[1], dtype=ws[0].dtype), wxt=not prompt)
            for fn in passes.values():
                fn()  # a warm-up each
            rounds = (min(repeats, 2) if prompt else repeats) + 1
            alt = best_in_rounds(lambda name, passes=passes: _pass_ms(passes[name]), list(passes), rounds)
            stock = alt.pop("linear")
            best = min(alt, key=alt.get) if alt else "linear"
            table[n] = best if alt and alt[best] <= WIN * stock else "linear"
        layouts[shape] = table
    return KernelPlan(layouts, probe_s=time.perf_counter() - t0)


def _first_bytes(weights: list[torch.Tensor], limit: int) -> list[torch.Tensor]:
    """The first of `weights` up to `limit` bytes in all; of a larger first weight, its first rows up to `limit`
    (a product bound by arithmetic costs the same per output row)."""
    out, total = [], 0
    for w in weights:
        total += w.numel() * w.element_size()
        if total > limit:
            if not out:
                out.append(w[: max(1, limit // (w.shape[1] * w.element_size()))])
            break
        out.append(w)
    return out


def _key(found: list[nn.Linear]) -> str:
    shapes = sorted({(lin.out_features, lin.in_features) for lin in found})
    return measurement_key(str(found[0].weight.dtype), shapes, native.library_key(), PROBE_ROWS + PROMPT_ROWS)


def cached_plan(found: list[nn.Linear]) -> KernelPlan:
    """The plan for these weights on this machine: from the cache file, else probed now and written there."""
    name = f"kernels-{_key(found)}.json"
    raw = read_cached(name)
    try:
        layouts = {tuple(map(int, k.split("x"))): {int(r): v for r, v in t.items()} for k, t in raw.items()}
        return KernelPlan(layouts, cached=True)
    except (ValueError, AttributeError):
        pass  # none cached (None has no items), or not a plan
    shapes = len({(lin.out_features, lin.in_features) for lin in found})
    log.info("measuring this CPU's fastest products for %d weight shapes, once (cached in %s) ...", shapes, cache_dir())
    with StealMeter() as steal:
        plan = probe(found)
    log.info("... measured in %.1f s", plan.probe_s)
    layouts = {f"{o}x{i}": {str(r): v for r, v in t.items()} for (o, i), t in plan.layouts.items()}
    write_cached(name, layouts, steal=steal)
    return plan
