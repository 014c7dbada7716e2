"""Weight-only int8 for the decoder's linear layers on CPU: fewer bytes per decode step, the same model for every
step kind.

A decode step streams every weight of the decoder once, so on a CPU its time is the weights' bytes over the
memory bandwidth. `Int8Linear` keeps, beside the layer's own parameters, a copy of its weight in int8 with one fp32
scale per output channel (symmetric: `scale = max|w_row| / 127`, `q = round(w / scale)`), and runs every product
on that copy — a quarter of fp32's bytes. The copy is stored in panels (`to_panels`: [⌈out / 64⌉, in, 64], 64
outputs column by column, so one column of a panel is one cache line), the layout twigvlm's int8 kernels read:

- up to `NATIVE_ROWS` rows (decode, the twig's drafts, chain and tree verification, a batch's step):
  `native.panel_int8`, which widens each int8 to fp32 once for all the rows and accumulates each output in fp32
  over k in order;
- more rows (a prompt's prefill): the many-row kernel (`native.gemm_int8`: the same sums, bit for bit, faster
  over hundreds of rows), except inside a prefill (`prefill_products`) where the CPU has native bf16 products:
  there in bf16, three times faster than fp32;
- where the kernel cannot be built: `x · (q · scale)ᵀ` in the input's dtype with the weight dequantised for the
  call.

The native kernels give every row the same bits whatever rows it is multiplied with, so decode, drafts and
verification run one model — the quantised one — bit for bit, and speculative decoding stays lossless with respect
to it (AR and SSD share the prefill; the others compute the same product up to the order of the additions, the
bf16 prefill up to bf16's rounding of its inputs). The copy follows the weight:
a layer whose weight changed since (loaded in place, or a copied layer — a twig grown from quantised base layers) is
quantised again before its next product. Like `FastLinear` it is a class swap (`apply_quantization`): the parameters
and the `state_dict` stay as loaded (fingerprints, the twig's draft head and stock `generate` read them), so memory
grows by the int8 copy (a quarter) and `stock_kernels` still gives the untouched model back. `int8_state` /
`load_int8_state` carry the quantised copies to and from a file, bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QUANTIZE_MODES
from ..errors import TwigVLMError
from . import compiled, native
from .kernels import FastLinear, linears
from .machine import bf16_pays

NATIVE_ROWS = 64  # `panel_int8` up to this many rows, `gemm_int8` beyond (faster there; the same sums)
PANEL = 64  # outputs per panel of the stored int8 copy (csrc/panel.c's PW)
QMAX = 127  # symmetric int8: -127..127 (-128 unused, so negation is exact)
PREFILL_ENV = "TWIGVLM_INT8_PREFILL"  # "fp32" keeps a prompt's int8 products in fp32 on bf16-native CPUs too
_BULK_BF16: ContextVar[bool] = ContextVar("twigvlm_int8_bulk_bf16", default=False)


@functools.cache
def _bf16_native() -> bool:
    return bf16_pays()


@contextlib.contextmanager
def prefill_products() -> Iterator[None]:
    """Inside the block — a prompt's prefill — int8 layers' products over more than NATIVE_ROWS rows run in bf16
    (x and the dequantised weight rounded to bf16, summed in fp32, the result back in fp32) where the CPU has
    native bf16 products: compute-bound there, and about 3× faster than fp32. Decoding, drafting and verification
    (at most NATIVE_ROWS rows) never run in it, so speculation stays lossless: AR and SSD share the prefill.
    TWIGVLM_INT8_PREFILL=fp32 keeps fp32. (The other layers' fastest layouts for a prompt's rows are the
    prefill's own: `Engine.prefill` and `pruned_prefill` enter `kernels.bulk_products`.)"""
    token = _BULK_BF16.set(os.environ.get(PREFILL_ENV, "auto") != "fp32" and _bf16_native())
    try:
        yield
    finally:
        _BULK_BF16.reset(token)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] → (q [out, in] int8, scale [out] fp32), symmetric per output channel; an all-zero row gets
    scale 1 (its q is all zeros)."""
    w = weight.detach().to(torch.float32)
    absmax = w.abs().amax(dim=1)  # [out]
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))  # [out]
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # [out, in]
    return q.contiguous(), scale.contiguous()


def to_panels(q: torch.Tensor) -> torch.Tensor:
    """q [out, in] → panels [⌈out / PANEL⌉, in, PANEL], contiguous: panel i, column k holds q[i·PANEL + j, k] at j,
    the outputs past `out` zero."""
    d_out, d_in = q.shape
    panels = -(-d_out // PANEL)
    padded = torch.zeros(panels * PANEL, d_in, dtype=q.dtype, device=q.device)  # [out', in]
    padded[:d_out] = q
    return padded.view(panels, PANEL, d_in).transpose(1, 2).contiguous()  # [out' / PANEL, in, PANEL]


def from_panels(panels: torch.Tensor, d_out: int) -> torch.Tensor:
    """`to_panels`' inverse: panels [⌈out / PANEL⌉, in, PANEL] → q [out, in], contiguous."""
    return panels.transpose(1, 2).reshape(panels.shape[0] * PANEL, panels.shape[1])[:d_out].contiguous()


def select_rows(panels: torch.Tensor, scale: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 copy of output rows `index` of a stored copy (panels, scale [out]), as panels and scales of their
    own: a product over them gives those outputs' bits (the twig's draft head, a subset of the full head)."""
    rows = panels[index // PANEL, :, index % PANEL]  # [len(index), in]: each output's column of its panel
    return to_panels(rows), scale[index].contiguous()


def dequantize(panels: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(panels of q [out, in] int8 (`to_panels`), scale [out]) → the weight they stand for, [out, in] in `dtype`
    (computed in fp32). bf16 on the CPU (a prompt's prefill, `prefill_products`) comes from the native kernel in
    one pass, the same bits."""
    if dtype is torch.bfloat16 and _native_operands(panels, scale):
        w = native.dequantize_bf16(panels, scale)  # straight from the panels: no copy of q in rows first
        if w is not None:
            return w
    q = from_panels(panels, scale.shape[0])  # [out, in]
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


def _native_operands(panels: torch.Tensor, scale: torch.Tensor) -> bool:
    return (
        panels.device.type == "cpu"
        and panels.dtype is torch.int8
        and scale.dtype is torch.float32
        and panels.dim() == 3
        and panels.shape[2] == PANEL
        and panels.is_contiguous()
        and scale.is_contiguous()
        and not torch.compiler.is_compiling()
    )


def int8_product(
    x: torch.Tensor, panels: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., in] · (q · scale)ᵀ (+ bias) → [..., out] in x's dtype, q stored as `panels` (`to_panels`): the
    native kernels where they are built (up to NATIVE_ROWS rows `panel_int8`, beyond it `gemm_int8`, or bf16
    inside a prefill on a bf16-native CPU), else the dequantised weight's product."""
    d_out, d_in = scale.shape[0], panels.shape[1]
    rows = x.numel() // d_in if d_in else 0
    bulk_bf16 = x.dtype is torch.float32 and rows > NATIVE_ROWS and _BULK_BF16.get()  # (`prefill_products`)
    if rows > 0 and not bulk_bf16 and x.device.type == "cpu" and native.gemv_library() is not None:
        product = native.panel_int8 if rows <= NATIVE_ROWS else native.gemm_int8
        out = product(x.reshape(rows, d_in), panels, scale, bias)  # [n, out] fp32
        if x.dtype is not torch.float32:
            out = out.to(x.dtype)
        return out.view(*x.shape[:-1], d_out)
    if bulk_bf16:
        b = None if bias is None else bias.to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), dequantize(panels, scale, torch.bfloat16), b).to(torch.float32)
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(x, dequantize(panels, scale, x.dtype), b)


class Int8Linear(FastLinear):
    """An `nn.Linear` (a FastLinear subclass, so `stock_kernels` covers it) whose forward runs on its int8 copy
    (`qweight`: panels [⌈out / 64⌉, in, 64] (`to_panels`), `qscale` [out]); set by `apply_quantization`. Inference
    only: no gradients."""

    qweight: torch.Tensor
    qscale: torch.Tensor
    qsource: tuple[int, int, torch.dtype]  # the weight the copy was made from (`_source`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled step (`runtime/compiled.py`): the kernel through its op
            if compiled.NATIVE.ready and x.device.type == "cpu":
                return compiled.traced_panel_int8(x, self.qweight, self.qscale, self.bias)
            return F.linear(x, dequantize(self.qweight, self.qscale, x.dtype), self.bias)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            raise TwigVLMError("an int8-quantised layer cannot be trained: load the model without quantize")
        if self.qsource != _source(self.weight):  # new weights since (loaded in place, copied, cast): follow them
            _quantize_layer(self)
        if self.bias is None and x.dtype is torch.float32 and x.is_contiguous() and x.device.type == "cpu":
            # a decode step's hot path (hundreds of calls per step): straight to the kernel, no reshapes
            rows = x.numel() // self.in_features
            if 0 < rows <= NATIVE_ROWS:
                out = native.panel_int8_rows(x, rows, self.qweight, self.qscale)
                if out is not None:
                    return out
        return int8_product(x, self.qweight, self.qscale, self.bias)


def _source(weight: torch.Tensor) -> tuple[int, int, torch.dtype]:
    """What identifies a weight's current values: its storage, its in-place version counter and its dtype."""
    return weight.data_ptr(), weight._version, weight.dtype


def _quantize_layer(lin: nn.Linear) -> None:
    q, lin.qscale = quantize_int8(lin.weight)
    lin.qweight = to_panels(q)
    lin.qsource = _source(lin.weight)


def check_quantize(mode: str, device: str | torch.device | None = None) -> str:
    """A known quantisation mode; with `device`, one that runs there (int8 runs on a CPU only), so that a load
    onto a GPU is refused before the model is read, not after."""
    if mode not in QUANTIZE_MODES:
        raise TwigVLMError(f"quantize {mode!r} is unknown: use one of {', '.join(QUANTIZE_MODES)}")
    if mode != "none" and device is not None and str(device).split(":")[0] != "cpu":
        raise TwigVLMError(f"quantize {mode!r} runs on a CPU, not on {device!r}: drop it or use device 'cpu'")
    return mode


def apply_quantization(modules: Iterable[nn.Module], mode: str) -> int:
    """ "int8": every nn.Linear (or FastLinear) inside `modules` runs on an int8 copy of its weight (made once per
    layer and kept); "none": back to plain nn.Linear (re-apply the kernels after). CPU only: int8 on another
    device is refused. Returns the number of layers quantised."""
    check_quantize(mode)
    found = linears(modules)
    compiled.classes_changed()
    if mode == "none":
        for lin in found:
            if type(lin) is Int8Linear:
                lin.__class__ = nn.Linear
        return 0
    if found and found[0].weight.device.type != "cpu":
        raise TwigVLMError(f"quantize int8 runs on a CPU; this model is on {found[0].weight.device.type}")
    count = 0
    for lin in found:
        if type(lin) not in (nn.Linear, FastLinear, Int8Linear):
            continue  # someone else's subclass: leave it alone
        if getattr(lin, "qsource", None) != _source(lin.weight):  # none yet, or of other values (a copied layer)
            _quantize_layer(lin)
        lin.__class__ = Int8Linear
        count += 1
    return count


def int8_state(named: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The int8 copies of the quantised layers inside `named` modules, by parameter-style names
    ("<prefix>.<layer path>.qweight" [out, in] / ".qscale" [out]), for a safetensors file."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in named.items():
        for name, sub in module.named_modules():
            if type(sub) is Int8Linear:
                key = ".".join(p for p in (prefix, name) if p)
                state[f"{key}.qweight"] = from_panels(sub.qweight, sub.qscale.shape[0])  # (the file: rows)
                state[f"{key}.qscale"] = sub.qscale
    return state


def load_int8_state(named: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> int:
    """Put saved int8 copies (`int8_state`'s names) back on the linear layers they name and quantise those with
    them; returns the number of layers restored. A half, extra or misshapen entry is an error naming it."""
    restored, expected = 0, set()
    for prefix, module in named.items():
        for name, sub in module.named_modules():
            key = ".".join(p for p in (prefix, name) if p)
            q, s = state.get(f"{key}.qweight"), state.get(f"{key}.qscale")
            if not isinstance(sub, nn.Linear) or (q is None and s is None):
                continue
            expected |= {f"{key}.qweight", f"{key}.qscale"}
            if q is None or s is None:
                raise TwigVLMError(f"quantized weights for {key} lack their {'qweight' if q is None else 'qscale'}")
            if q.dtype is not torch.int8 or q.shape != sub.weight.shape or s.shape != (sub.weight.shape[0],):
                raise TwigVLMError(f"quantized weights for {key} do not fit its layer {tuple(sub.weight.shape)}")
            sub.qweight, sub.qscale = to_panels(q), s.to(torch.float32).contiguous()
            sub.qsource = _source(sub.weight)
            sub.__class__ = Int8Linear
            compiled.classes_changed()
            restored += 1
    extra = sorted(set(state) - expected)
    if extra:
        raise TwigVLMError(f"quantized weights have entries for no layer here: {', '.join(extra[:3])}")
    return restored
