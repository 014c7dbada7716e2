"""The native products (`csrc/gemv.c` for few rows, `csrc/gemm.c` for many, `csrc/panel.c` for int8 weights
stored in panels): built once per machine with its C compiler, loaded with ctypes.

MKL's fp32 `x · Wᵀ` over the 1–8 rows that decoding and verification run reaches a fraction of the memory
bandwidth on many CPUs (on AMD ones it takes a generic path); the product is bound by reading the weights, so a
plain kernel that streams each weight row once for all rows does better. Over a prompt's hundreds of rows, where a
product is bound by arithmetic, a second kernel (`csrc/gemm.c`, `gemm`) copies the weights into panels and keeps
a block of the result in registers, as BLAS libraries do (the kernel plan picks between them, and MKL, by
measurement). `gemm_lanes` runs gemm's tiles in gemv's order of additions: a step's many rows at about gemm's
speed with the bits of one-row decoding. The library is compiled at first use with the machine's compiler
(`$CC`, else `cc`, `gcc`, `clang`) for this CPU (`-march=native`) and OpenMP, into the twigvlm cache
(`$TWIGVLM_CACHE/native`, keyed by the source, the compiler, the flags and the CPU), in a few seconds.
Where no compiler works the kernel is simply unavailable: `gemv_library()` returns None, `build_error()` says why,
and the kernel plan never picks it. The OpenMP runtime is the libgomp that torch already loaded, so the kernel runs
on torch's threads (`torch.get_num_threads()`, which `--threads` sets) rather than on a second pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .machine import cache_dir, cpuinfo_line

log = logging.getLogger(__name__)

SOURCES = ("csrc/gemv.c", "csrc/gemm.c", "csrc/panel.c", "csrc/barrier.h", "csrc/layer.c")  # layer.c: the rest
# The product entry points and their pointer arguments (x, w, [scale,] b, y), each followed by n, in, out, threads.
ENTRY_POINTERS = {
    f"twig_{k}": 4 for k in ("gemv", "gemv_bf16", "gemm", "gemm_bf16", "gemm_lanes", "gemm_lanes_bf16")
} | {
    "twig_panel_i8": 5,
    "twig_gemm_i8": 5,
}


def _sources() -> dict[str, bytes]:
    return {Path(name).name: (resources.files("twigvlm.runtime") / name).read_bytes() for name in SOURCES}


def _source() -> bytes:
    """Every source file's bytes, one after the other (what the build's cache key and `library_key` hash)."""
    return b"\0".join(_sources().values())


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _arch_flags() -> list[str]:
    """The CPU's own instructions, and no fused multiply-add that the source does not ask for: two kernels that must
    give a row the same bits (gemv.c's and gemm.c's lane tiles) may not leave `a * b + c` to the compiler, which
    fuses it in one loop and not in another (the portable path on a CPU with FMA: aarch64, x86 without AVX2)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        return ["-march=native", "-ffp-contract=off"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native", "-ffp-contract=off"]
    return ["-ffp-contract=off"]


def _cpu_id() -> str:
    return cpuinfo_line("flags", "Features") or platform.processor() or platform.machine()


class _Build:
    error: str | None = None


def _compile(cc: str, src: Path, out: Path, flags: list[str]) -> str | None:
    """Compile src into out; None on success, else the compiler's last line."""
    cmd = [cc, "-O3", *flags, "-pthread", "-shared", "-fPIC", str(src), "-o", str(out)]  # (gemm.c's thread keys)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if done.returncode != 0:
        lines = [x for x in (done.stderr or done.stdout).splitlines() if x.strip()]
        return lines[-1] if lines else f"{cc} exited with {done.returncode}"
    return None


@functools.lru_cache(maxsize=1)
def gemv_library() -> ctypes.CDLL | None:
    """The loaded kernel library (compiled now if not in the cache), or None where it cannot be built."""
    _Build.error = None
    cc = _compiler()
    if cc is None:
        _Build.error = "no C compiler found (set CC, or install gcc or clang)"
        return None
    source = _source()
    folder = cache_dir() / "native"
    for flags in ([*_arch_flags(), "-fopenmp"], _arch_flags(), ["-ffp-contract=off"]):  # without OpenMP: one thread
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), _cpu_id().encode()]))
        path = folder / f"twig_gemv-{key.hexdigest()[:16]}.so"
        if not path.exists():
            log.info("building the native product kernel with %s %s, once (cached in %s)", Path(cc).name,
                     " ".join(flags), folder)  # fmt: skip
            try:
                folder.mkdir(parents=True, exist_ok=True)
                error = build(cc, _sources(), flags, path)
            except OSError as exc:
                _Build.error = f"cannot write {folder}: {exc}"
                return None
            if error is not None:
                _Build.error = f"{Path(cc).name} {' '.join(flags)}: {error}"
                continue
        try:
            lib = load(path)
        except OSError as exc:
            _Build.error = str(exc)
            continue
        _Build.error = None
        return lib
    return None


def build(cc: str, sources: dict[str, bytes], flags: list[str], path: Path) -> str | None:
    """Compile `sources` (file name → bytes, as `_sources` gives them; layer.c includes the others) into the
    library `path`, written whole or not at all; None on success, else the compiler's last line."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        for name, text in sources.items():
            (Path(tmp) / name).write_bytes(text)
        error = _compile(cc, Path(tmp) / "layer.c", Path(tmp) / "gemv.so", flags)
        if error is None:
            os.replace(Path(tmp) / "gemv.so", path)  # atomic: parallel builders each write a whole file
        return error


def load(path: Path) -> ctypes.CDLL:
    """A built library, its product entry points' argument types declared."""
    lib = ctypes.CDLL(str(path))
    for name, pointers in ENTRY_POINTERS.items():
        fn = getattr(lib, name)  # (attribute access keeps the function object, and so its argument types)
        fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * 3 + [ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.twig_dequant_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.twig_dequant_bf16.restype = ctypes.c_int
    return lib


def build_error() -> str | None:
    """Why the kernel is unavailable (None when it loaded or was not tried)."""
    return _Build.error


def library_key() -> str:
    """Identifies the kernel in kernel-plan cache keys: its source hash, or "none" where it is unavailable."""
    return hashlib.sha256(_source()).hexdigest()[:12] if gemv_library() is not None else "none"


LANES_ROWS = 17  # from this many rows on a step's product runs `gemm_lanes` where it would run `gemv` (layer.c's)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)  # what `gemv` streams (int8 weights go through `panel_int8`)


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel can compute this product: fp32 or bf16 (x and weight alike) on the CPU, no gradient
    needed, a contiguous weight (and bias), and the kernel built."""
    return (
        x.dtype is weight.dtype
        and weight.dtype in WEIGHT_DTYPES
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and x.device.type == "cpu"
        and weight.is_contiguous()
        and (bias is None or bias.is_contiguous())
        and gemv_library() is not None
    )


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous fp32 (itself when it already is: the hot path of a decode step makes no copy)."""
    return t if t.dtype is torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [n, in] · weight[out, in]ᵀ (+ bias) → [n, out] in x's dtype with the native kernel (where `takes` says it
    can). A bf16 weight is widened to fp32 in the kernel and accumulated in fp32, as MKL's bf16 product does."""
    return _product("gemv", x, weight, bias)


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """As `gemv` on the many-row kernel (`csrc/gemm.c`: a prompt's rows), whose result for a row does not depend
    on the other rows multiplied with it."""
    return _product("gemm", x, weight, bias)


def gemm_lanes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """As `gemv`, bit for bit, on the many-row kernel's tiles (`csrc/gemm.c`, each output summed in gemv's order):
    a step's many-row products (a tree's verification, a batch's step) at about `gemm`'s speed."""
    return _product("gemm_lanes", x, weight, bias)


def _product(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    lib = gemv_library()
    assert lib is not None, f"{kind}() called where the native kernel is unavailable"
    rows = _fp32(x)
    n, d_in = rows.shape
    d_out = weight.shape[0]
    y = torch.empty(n, d_out, dtype=torch.float32)  # [n, out]
    b = None if bias is None else _fp32(bias)
    bf16 = weight.dtype is torch.bfloat16
    fn = getattr(lib, f"twig_{kind}_bf16" if bf16 else f"twig_{kind}")
    w = weight.view(torch.int16) if bf16 else weight
    b_ptr = None if b is None else b.data_ptr()
    rc = fn(rows.data_ptr(), w.data_ptr(), b_ptr, y.data_ptr(), n, d_in, d_out, torch.get_num_threads())
    if rc:
        _refused(rc, fn, n, d_in, d_out)
    return y if x.dtype is torch.float32 else y.to(x.dtype)


def panel_int8_rows(x: torch.Tensor, rows: int, panels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """`panel_int8` without a bias for a contiguous fp32 x [..., in] of `rows` rows, shaped [..., out]: the one
    call a decode step makes per layer product, with nothing but the kernel call around it. None where the kernel
    is unavailable."""
    lib = gemv_library()
    if lib is None:
        return None
    y = torch.empty(*x.shape[:-1], scale.shape[0])  # [..., out] fp32
    _int8_call(lib.twig_panel_i8, x, rows, panels, scale, None, y)
    return y


def panel_int8(
    x: torch.Tensor, panels: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [n, in] · (q · scale)ᵀ (+ bias) → [n, out] fp32, with q [out, in] int8 stored as `panels` [⌈out / 64⌉,
    in, 64] (`quant.to_panels`) and scale [out] fp32, both contiguous; each output summed over k in order in
    fp32, so a row's result does not depend on the rows beside it. x and bias are made fp32 here."""
    return _int8_product("twig_panel_i8", x, panels, scale, bias)


def gemm_int8(
    x: torch.Tensor, panels: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """As `panel_int8` (the same sums, bit for bit) on the many-row kernel (`gemm`: a prompt's rows)."""
    return _int8_product("twig_gemm_i8", x, panels, scale, bias)


def _int8_product(
    name: str, x: torch.Tensor, panels: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    lib = gemv_library()
    assert lib is not None, f"{name} called where the native kernel is unavailable"
    rows = _fp32(x)
    y = torch.empty(rows.shape[0], scale.shape[0], dtype=torch.float32)  # [n, out]
    _int8_call(getattr(lib, name), rows, rows.shape[0], panels, scale, None if bias is None else _fp32(bias), y)
    return y


def _int8_call(
    fn: Any,
    x: torch.Tensor,
    rows: int,
    panels: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
) -> None:
    """The kernel call the int8 entry points make (fn: twig_panel_i8 or twig_gemm_i8): x (contiguous fp32, `rows`
    rows) into y, all pointers."""
    d_out, d_in = scale.shape[0], panels.shape[1]
    b_ptr = None if bias is None else bias.data_ptr()
    args = (x.data_ptr(), panels.data_ptr(), scale.data_ptr(), b_ptr, y.data_ptr(), rows, d_in, d_out)
    rc = fn(*args, torch.get_num_threads())
    if rc:  # (the decode step's hot path: no call unless the kernel refused)
        _refused(rc, fn, rows, d_in, d_out)


def _refused(rc: int, fn: Any, n: int, d_in: int, d_out: int) -> None:
    """The error for a product entry point's non-zero return code: 1 bad sizes, 2 out of memory (gemm's panels)."""
    if rc == 2:
        raise MemoryError(f"native {fn.__name__}: no memory for its weight panels")
    raise ValueError(f"native {fn.__name__} refused sizes n={n} in={d_in} out={d_out}")


def dequantize_bf16(panels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """(q [out, in] int8 stored as `panels` [⌈out / 64⌉, in, 64] (`quant.to_panels`), scale [out] fp32), both
    contiguous on the CPU → q · scale as bf16 [out, in], in one pass (torch's widen, multiply and round, bit for
    bit); None where the kernel is unavailable."""
    lib = gemv_library()
    if lib is None:
        return None
    d_out, d_in = scale.shape[0], panels.shape[1]
    w = torch.empty(d_out, d_in, dtype=torch.bfloat16)  # [out, in]
    if lib.twig_dequant_bf16(panels.data_ptr(), scale.data_ptr(), w.data_ptr(), d_out, d_in, torch.get_num_threads()):
        raise ValueError(f"native dequantisation refused sizes out={d_out} in={d_in}")
    return w
