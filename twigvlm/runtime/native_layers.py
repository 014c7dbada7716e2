"""Native decoder layers (`csrc/layer.c`): a range of Llama-style layers over a few new tokens in one C call.

On a CPU a small decoder's decode step is half products and half everything around them: each stock layer is a few
dozen small torch operations and Python frames (norms, RoPE, the cache write, attention, residuals), about 0.2 ms
a layer on a 2-core machine, and compiled steps (`compiled.py`) take only part of that away. `NativeLayers` runs
the whole range of layers a step needs — the base layers, or the twig's — in one call of the native library, on
the same product kernels as `native.gemv` (fp32 or int8 weights, fp32 accumulation).

What qualifies (`_why_not`): a layer whose class is one of `LAYER_CLASSES` (transformers' Llama and Qwen2
layers, whose arithmetic `layer.c` repeats: RMSNorm, rotate-half RoPE, grouped-query attention without a sliding
window, a SiLU-gated MLP), fp32 activations, fp32 (`nn.Linear`, `FastLinear`) or int8 (`Int8Linear`) weights, on
the CPU, with gradients off. A call qualifies (`runs`) when it is one sequence of at most `MAX_ROWS` new tokens,
every layer holds a contiguous fp32 cache with keys already in it, and no layer output needs an addition; or
(`runs_rows`) when it is a batch's pass (`generation/rows.py`) of at most `MAX_BATCH_ROWS` tokens in all, each row
its own sequence in the batch's slots. Anything else runs the stock layer, as before. A generation's start
(`revalidate`) makes the next call check the weights' pointers again; between, a step pays no per-layer checks.

A call runs on torch's threads, or on fewer while another process takes their cores (`thread_governor.py`, which
reads how often each call's threads were preempted, as the library reports it).

Each layer is checked once against its stock forward on its own weights (`_self_check`: a block of 3 tokens on a
short cache); a layer that does not match within `TOLERANCE` is left to the stock path and logged. Results equal
the stock layer's up to the order of floating-point additions (the oracle tests assert closeness, and that greedy
ids agree with the stock path through whole generations).
"""

from __future__ import annotations

import ctypes
import logging
import time
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import native
from .cache import LayerKV
from .quant import Int8Linear, _quantize_layer, _source
from .thread_governor import GOVERNOR

log = logging.getLogger(__name__)

LAYER_CLASSES = ("LlamaDecoderLayer", "Qwen2DecoderLayer")
MAX_ROWS = 64  # blocks of up to this many new tokens (decode, drafts, a tree's verification); longer ones run stock
MAX_BATCH_ROWS = 256  # a batched pass of up to this many tokens in all (rows × block) runs natively
TOLERANCE = 1e-4  # the self-check's largest difference to the stock layer, relative to the output's scale
_F32, _I8 = 0, 1
_PRODUCTS = ("q", "k", "v", "o", "gate", "up", "down")


class _Linear(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("out", ctypes.c_int64),
        ("inp", ctypes.c_int64),
        ("fmt", ctypes.c_int64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, _Linear) for name in _PRODUCTS),
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("eps1", ctypes.c_double),
        ("eps2", ctypes.c_double),
        ("scaling", ctypes.c_double),
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("inter", ctypes.c_int64),
    ]


def _library() -> ctypes.CDLL | None:
    lib = native.gemv_library()
    if lib is not None and not getattr(lib, "_twig_layers_typed", False):
        fn = lib.twig_layers
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        fn.argtypes += [ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        lib.twig_set_spin_ns.argtypes, lib.twig_set_spin_ns.restype = [ctypes.c_int64], ctypes.c_int64
        lib.twig_barrier_sleeps.argtypes, lib.twig_barrier_sleeps.restype = [], ctypes.c_int64
        lib._twig_layers_typed = True
    return lib


def _linears(layer: nn.Module) -> dict[str, nn.Module]:
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "q": attn.q_proj,
        "k": attn.k_proj,
        "v": attn.v_proj,
        "o": attn.o_proj,
        "gate": mlp.gate_proj,
        "up": mlp.up_proj,
        "down": mlp.down_proj,
    }


def _fp32_contiguous(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype is torch.float32 and t.is_contiguous() and t.device.type == "cpu")


def _why_not(layer: nn.Module) -> str | None:
    """Why `layer` cannot run natively (None: it can)."""
    if type(layer).__name__ not in LAYER_CLASSES:
        return f"{type(layer).__name__} is not one of {', '.join(LAYER_CLASSES)}"
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or getattr(attn, "q_norm", None) is not None:
        return "attention or MLP of another shape"
    config = getattr(attn, "config", None)
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(attn, "sliding_window", None):
        return "not a SiLU MLP with full attention"
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        if not type(norm).__name__.endswith("RMSNorm") or not _fp32_contiguous(norm.weight):
            return "norms other than fp32 RMSNorm"
    for name, lin in _linears(layer).items():
        if not isinstance(lin, nn.Linear) or not _fp32_contiguous(lin.bias):
            return f"{name} is not an fp32 linear layer"
        if not isinstance(lin, Int8Linear) and not _fp32_contiguous(lin.weight):
            return f"{name}'s weight is not contiguous fp32 on the CPU"
    return None


class _Packed:
    """One layer's C description and the tensors its pointers point into (kept alive with it)."""

    def __init__(self, layer: nn.Module) -> None:
        attn = layer.self_attn
        self.layer = weakref.ref(layer)
        self.keep: list[torch.Tensor] = []
        self.watch: list[tuple[nn.Module, type, torch.Tensor, int, int, torch.Tensor | None]] = []
        fields = {name: self._linear(lin) for name, lin in _linears(layer).items()}
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        d = attn.head_dim
        self.struct = _Layer(
            **fields,
            norm1=n1.weight.data_ptr(),
            norm2=n2.weight.data_ptr(),
            eps1=float(n1.variance_epsilon),
            eps2=float(n2.variance_epsilon),
            scaling=float(attn.scaling),
            hidden=n1.weight.shape[0],
            heads=attn.q_proj.out_features // d,
            kv_heads=attn.k_proj.out_features // d,
            head_dim=d,
            inter=layer.mlp.gate_proj.out_features,
        )
        self.keep += [n1.weight, n2.weight]
        self.pointer = ctypes.pointer(self.struct)

    def _linear(self, lin: nn.Module) -> _Linear:
        bias = lin.bias.data_ptr() if lin.bias is not None else None
        if lin.bias is not None:
            self.keep.append(lin.bias)
        weight = lin.weight
        if isinstance(lin, Int8Linear):
            if lin.qsource != _source(weight):  # new weights since the copy was made: follow them
                _quantize_layer(lin)
            self.keep += [lin.qweight, lin.qscale]
            w, scale, fmt, copy = lin.qweight.data_ptr(), lin.qscale.data_ptr(), _I8, lin.qweight
        else:
            self.keep.append(weight)
            w, scale, fmt, copy = weight.data_ptr(), None, _F32, None
        self.watch.append((lin, type(lin), weight, weight._version, weight.data_ptr(), copy))
        return _Linear(w=w, scale=scale, bias=bias, out=lin.out_features, inp=lin.in_features, fmt=fmt)

    def fresh(self) -> bool:
        """Whether the pointers still describe the layer: the same classes, the same weight tensors with the same
        storage and values (the in-place version counter), and the same int8 copies."""
        for lin, cls, weight, version, ptr, copy in self.watch:
            if type(lin) is not cls or lin._parameters["weight"] is not weight or weight._version != version:
                return False
            if weight.data_ptr() != ptr or (copy is not None and lin.__dict__.get("qweight") is not copy):
                return False
        return True


class NativeLayers:
    """Runs qualifying ranges of decoder layers in one native call (`runs` says which calls qualify)."""

    def __init__(self, rotary: Any) -> None:
        self.rotary = rotary  # the adapter's rotary(hidden, position_ids) → (cos, sin): the self-check's tables
        self._packed: weakref.WeakKeyDictionary[nn.Module, _Packed] = weakref.WeakKeyDictionary()
        self._refused: weakref.WeakKeyDictionary[nn.Module, tuple[type, ...]] = weakref.WeakKeyDictionary()
        self._checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # layers whose self-check passed
        self._told: set[tuple[str, str]] = set()  # (layer class, reason) already logged: one line, not one per layer
        self._ranges: dict[tuple[int, ...], tuple[int, list[_Packed]]] = {}  # layers (ids) → (epoch checked, packed)
        self._epoch = 0
        self.calls = 0  # native range calls made (tests and the bench read it)

    @staticmethod
    def available() -> bool:
        """Whether the native library is built here."""
        return _library() is not None

    def _pack(self, layer: nn.Module) -> _Packed | None:
        """The layer's packed description (made at its first use, and again when its weights or classes change;
        checked against the stock layer once), or None where it cannot run natively."""
        entry = self._packed.get(layer)
        if entry is not None and entry.fresh():
            return entry
        classes = tuple(type(lin) for lin in _linears(layer).values()) if hasattr(layer, "mlp") else ()
        if self._refused.get(layer) == classes:
            return None  # refused for these classes already
        why = _why_not(layer)
        packed = _Packed(layer) if why is None else None
        if packed is not None and layer not in self._checked:
            why = _self_check(self, layer, packed)
        if why is not None:
            if (type(layer).__name__, why) not in self._told:
                self._told.add((type(layer).__name__, why))
                # another family's layers (M-RoPE, …) always run stock: said at debug level, not in every command's
                # output; a layer of a covered class refused for its weights or a failed check is worth a line
                level = logging.INFO if type(layer).__name__ in LAYER_CLASSES else logging.DEBUG
                log.log(level, "%s decoder layers run stock, not natively: %s", type(layer).__name__, why)
            self._refused[layer] = classes
            self._packed.pop(layer, None)
            return None
        self._checked.add(layer)
        self._packed[layer] = packed
        return packed

    def covers(self, layers: Sequence[nn.Module]) -> bool:
        """Whether every one of `layers` runs natively (each is packed and checked now, if it was not yet)."""
        return all(self._pack(layer) is not None for layer in layers)

    def runs(
        self, layers: Sequence[nn.Module], hidden: torch.Tensor, caches: Sequence[LayerKV | None], adds: Sequence
    ) -> list[_Packed] | None:
        """The packed layers when this call can run natively (else None: the stock path)."""
        b, q, _ = hidden.shape
        if b != 1 or not 0 < q <= MAX_ROWS or adds or hidden.dtype is not torch.float32 or not layers:
            return None
        if hidden.device.type != "cpu" or torch.is_grad_enabled():  # a native call has no backward
            return None
        for kv in caches:
            if kv is None or kv.k is None or kv.k.dtype is not torch.float32 or kv.k.shape[0] != 1:
                return None
        return self._range(layers)

    def runs_rows(self, layers: Sequence[nn.Module], hidden: torch.Tensor) -> list[_Packed] | None:
        """The packed layers when a batched pass of hidden [R, q, H] (`generation/rows.py`: each row its own
        sequence, its caches in the batch's slots) can run natively, else None."""
        r, q, _ = hidden.shape
        if not 0 < q <= MAX_ROWS or r * q > MAX_BATCH_ROWS or hidden.dtype is not torch.float32 or not layers:
            return None
        if hidden.device.type != "cpu" or torch.is_grad_enabled():  # a native call has no backward
            return None
        return self._range(layers)

    def _range(self, layers: Sequence[nn.Module]) -> list[_Packed] | None:
        """Every layer's packed description (a range seen before: from the cache), or None if one cannot run."""
        key = tuple(map(id, layers))
        entry = self._ranges.get(key)
        if entry is not None and all(p.layer() is layer for p, layer in zip(entry[1], layers, strict=True)):
            if entry[0] == self._epoch:  # checked since the last `revalidate`
                return entry[1]
            if all(p.fresh() for p in entry[1]):
                self._ranges[key] = (self._epoch, entry[1])
                return entry[1]
        found = [self._pack(layer) for layer in layers]
        if any(p is None for p in found):
            return None
        if len(self._ranges) >= 64:  # ranges of layers since dropped (old twigs): start over
            self._ranges.clear()
        self._ranges[key] = (self._epoch, found)  # type: ignore[assignment]
        return found  # type: ignore[return-value]

    def revalidate(self) -> None:
        """Check every range's weights again at its next call (a generation starts: its weights are read now and
        trusted to its end, so a step pays no per-layer checks)."""
        self._epoch += 1

    def run(
        self,
        packed: Sequence[_Packed],
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        caches: Sequence[LayerKV],
        tail: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [1, q, H] through the packed layers, each reading and extending its cache (the block's keys and
        values are written after each layer's entries and counted); tail: a draft tree's mask [q, m] over the
        last m keys, as `Engine.run_layers` takes it. Returns the output [1, q, H]."""
        q = hidden.shape[1]
        for kv in caches:
            kv.window(q)  # room for the block (the buffers may grow here)
        keys, values = [kv.k for kv in caches], [kv.v for kv in caches]
        x = self.run_rows(packed, hidden, rope, keys, values, [[kv.length] for kv in caches], tail)
        for kv in caches:
            kv.commit(q)
        return x

    def run_rows(
        self,
        packed: Sequence[_Packed],
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        lengths: Sequence[Sequence[int]],
        tail: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [R, q, H] through the packed layers in one library call, row r a sequence of its own: layer i's
        buffers keys[i], values[i] [≥ R, H_kv, cap_i, D], row r in slot r holding lengths[i][r] entries with room
        for q more. Each row's block is written after its own entries; the caller counts what it keeps. tail: draft
        trees' masks [R, q, m] over each row's last m keys once its block is in ([q, m] for one row). Returns
        [R, q, H] (a copy of hidden, updated by the layers)."""
        lib = _library()
        assert lib is not None
        rows, q = hidden.shape[:2]
        x = hidden.to(torch.float32, copy=True).contiguous()  # [R, q, H], updated in place
        cos, sin = (t.to(torch.float32).expand(rows, q, -1).reshape(rows * q, -1).contiguous() for t in rope)
        count = len(packed)
        kptr, vptr = (ctypes.c_void_p * count)(), (ctypes.c_void_p * count)()
        caps, lens = (ctypes.c_int64 * count)(), (ctypes.c_int64 * (count * rows))()
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            if not (k.is_contiguous() and v.is_contiguous()) or k.dtype is not torch.float32 or k.shape[0] < rows:
                raise RuntimeError("native layers need contiguous fp32 cache buffers with a slot per row")
            kptr[i], vptr[i], caps[i] = k.data_ptr(), v.data_ptr(), k.shape[2]
            lens[i * rows : (i + 1) * rows] = list(lengths[i])
        structs = (ctypes.POINTER(_Layer) * count)(*(p.pointer for p in packed))
        mask = None if tail is None else tail.to(torch.uint8).reshape(rows, q, -1).contiguous()  # [R, q, m]
        m = 0 if mask is None else mask.shape[2]
        args = (structs, count, x.data_ptr(), rows, q, cos.data_ptr(), sin.data_ptr(), kptr, vptr, caps, lens)
        threads, preempted = GOVERNOR.threads(torch.get_num_threads()), ctypes.c_int64(0)
        t0 = time.perf_counter()
        code = lib.twig_layers(*args, None if mask is None else mask.data_ptr(), m, threads, ctypes.byref(preempted))
        GOVERNOR.record(time.perf_counter() - t0, preempted.value)
        if code:
            raise RuntimeError(f"native decoder layers refused the call (code {code}): rows={rows} q={q} tail={m}")
        self.calls += 1
        return x


def _self_check(owner: NativeLayers, layer: nn.Module, packed: _Packed) -> str | None:
    """Run `layer` natively and stock on the same random block of 3 tokens over a 5-token cache; a reason when
    they differ by more than TOLERANCE (relative to the output's largest magnitude), else None."""
    hidden = layer.input_layernorm.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, hidden, generator=gen)
    positions = torch.arange(8).view(1, 8)
    rope = owner.rotary(x, positions)
    with torch.inference_mode():
        stock_kv, ours_kv = LayerKV(), LayerKV()
        for kv in (stock_kv, ours_kv):
            first = tuple(t[:, :5] for t in rope)
            out = layer(
                x[:, :5],
                attention_mask=None,
                position_ids=positions[:, :5],
                past_key_values=kv,
                position_embeddings=first,
            )
        block = tuple(t[:, 5:] for t in rope)
        mask = torch.ones(1, 1, 3, 8, dtype=torch.bool).tril(5)
        out = layer(
            x[:, 5:],
            attention_mask=mask,
            position_ids=positions[:, 5:],
            past_key_values=stock_kv,
            position_embeddings=block,
        )
        want = out[0] if isinstance(out, tuple) else out
        got = owner.run([packed], x[:, 5:], block, [ours_kv])
    scale = float(want.abs().max()) or 1.0
    diff = float((got - want).abs().max()) / scale
    keys = float((ours_kv.keys() - stock_kv.keys()).abs().max()) / (float(stock_kv.keys().abs().max()) or 1.0)
    if diff > TOLERANCE or keys > TOLERANCE:
        return f"the self-check differs from the stock layer by {max(diff, keys):.2e} (relative)"
    return None
