"""Two builds of twigvlm's native kernels, timed against each other in one process: what a change to the kernels'
sources (`runtime/csrc/`, or a compile-time switch in them) is worth on this machine.

Each build compiles the library's sources as `twigvlm/runtime/native.py` does (the machine's C compiler, -O3,
-march=native, OpenMP): build B is this tree's, with extra flags (`--b=FLAGS`); build A takes `--a=FLAGS` and,
with `--a-src`, other sources: a file (which replaces the tree's file of the same name, e.g. a copy of panel.c), or
`git:REV` for all of the library's sources at a revision. Both are loaded and their int8 product (`twig_panel_i8`
on the weights' int8 panels, or, in a build from before the panels, `twig_gemv_i8` on row-major int8) or, with
--fp32, `twig_gemv`, run over the weights of a decoder shaped like the demo's (30 layers, hidden 576, MLP 1536, 3
KV heads of 64; random, far larger than the caches, so each pass streams them from memory as a decode step does),
alternating A and B one pass at a time, so that a busy spell of a shared machine touches both alike. Prints the
median (with --best, the fastest) ms per pass over all layers for each number of rows of x, B's speed-up, and
whether the two builds' outputs are bit-identical.

    .venv/bin/python scripts/bench_kernel_builds.py --a-src git:7123700 [--rows 1,2,3,4,8] [--repeats 21] [--best]
    .venv/bin/python scripts/bench_kernel_builds.py --a-src /tmp/panel.c --b=-DPFD=32
    .venv/bin/python scripts/bench_kernel_builds.py --a-src git:HEAD~1 --fp32
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from twigvlm.runtime import native
from twigvlm.runtime.machine import speed_flags
from twigvlm.runtime.quant import quantize_int8, to_panels

sys.path.insert(0, str(Path(__file__).parent))
from bench_matmul import layer_weights  # noqa: E402 - a sibling script

INT8_ENTRIES = ("twig_panel_i8", "twig_gemv_i8")  # this tree's; a build from before the int8 panels


def build(folder: Path, name: str, replaced: dict[str, bytes], flags: list[str]) -> ctypes.CDLL:
    """The library from its sources (those named in `replaced` swapped for its bytes), compiled with `flags` too;
    its product entry points' argument types declared (whichever of them it has)."""
    cc = native._compiler()
    if cc is None:
        sys.exit("bench_kernel_builds: no C compiler found (set CC, or install gcc or clang)")
    sources = {**native._sources(), **replaced}
    path = folder / f"{name}.so"
    error = native.build(cc, sources, [*native._arch_flags(), "-fopenmp", *flags], path)
    if error is not None:
        sys.exit(f"bench_kernel_builds: build {name} failed: {error}")
    lib = ctypes.CDLL(str(path))
    for entry, pointers in {**native.ENTRY_POINTERS, "twig_gemv_i8": 5}.items():  # (and the old int8 entry)
        if hasattr(lib, entry):
            fn = getattr(lib, entry)
            fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * 3 + [ctypes.c_int]
            fn.restype = ctypes.c_int
    return lib


def sources_of(spec: str) -> dict[str, bytes]:
    """Build A's sources: a file (replacing the tree's file of its name), or every library source at a git
    revision (`git:REV`)."""
    if not spec.startswith("git:"):
        try:
            return {Path(spec).name: Path(spec).read_bytes()}
        except OSError as e:
            sys.exit(f"bench_kernel_builds: cannot read {spec}: {e.strerror}")
    root, rev, folder = Path(__file__).resolve().parent.parent, spec[4:], "twigvlm/runtime/csrc"
    listed = subprocess.run(["git", "ls-tree", "--name-only", rev, f"{folder}/"], capture_output=True, cwd=root)
    if listed.returncode != 0 or not listed.stdout.strip():
        sys.exit(f"bench_kernel_builds: no kernel sources at {rev}: {listed.stderr.decode().strip()}")
    out: dict[str, bytes] = {}
    for path in listed.stdout.decode().split():
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, cwd=root)
        out[Path(path).name] = shown.stdout
    return out


def int8_entry(lib: ctypes.CDLL) -> str:
    return next(e for e in INT8_ENTRIES if hasattr(lib, e))


def one_pass(
    lib: ctypes.CDLL, mats: list, xs: dict[int, torch.Tensor], ys: list[torch.Tensor], n: int, threads: int
) -> float:
    """Every product once with `lib`: x [n, in] (by width) into ys; returns the seconds. mats: (fp32 w, None), or
    (int8 rows, int8 panels, scale)."""
    t0 = time.perf_counter()
    entry = None if mats[0][1] is None else int8_entry(lib)
    for mat, y in zip(mats, ys, strict=True):
        x, d_out, d_in = xs[mat[0].shape[1]], mat[0].shape[0], mat[0].shape[1]
        if entry is None:
            lib.twig_gemv(x.data_ptr(), mat[0].data_ptr(), None, y.data_ptr(), n, d_in, d_out, threads)
        else:
            q = mat[1] if entry == "twig_panel_i8" else mat[0]
            getattr(lib, entry)(
                x.data_ptr(), q.data_ptr(), mat[2].data_ptr(), None, y.data_ptr(), n, d_in, d_out, threads
            )
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a-src", default=None, metavar="FILE|git:REV", help="build A's sources (default: this tree's)")
    ap.add_argument("--a", default="", metavar="FLAGS", help="build A's extra compiler flags")
    ap.add_argument("--b", default="", metavar="FLAGS", help="build B's extra compiler flags")
    ap.add_argument("--fp32", action="store_true", help="fp32 weights (twig_gemv) instead of int8")
    ap.add_argument("--best", action="store_true", help="the fastest pass of each build instead of the median")
    ap.add_argument("--rows", default="1,2,3,4,8")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    print(f"CPU flags: {speed_flags()}; {threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        a_src = {} if args.a_src is None else sources_of(args.a_src)
        libs = {"A": build(Path(tmp), "a", a_src, args.a.split()), "B": build(Path(tmp), "b", {}, args.b.split())}
        weights = layer_weights(args.layers, 576, 1536, 192)
        if args.fp32:
            mats = [(w.contiguous(), None) for w in weights]
        else:
            mats = [(q, to_panels(q), s) for q, s in map(quantize_int8, weights)]
        kinds = "twig_gemv" if args.fp32 else " / ".join(int8_entry(libs[k]) for k in ("A", "B"))
        print(f"A: sources {args.a_src or 'of this tree'} {args.a}; B: this tree's {args.b}; {kinds}, "
              f"{len(mats)} products, {'fastest' if args.best else 'median'} of {args.repeats}")  # fmt: skip
        print("| rows | A ms | B ms | A / B | identical |")
        print("|---|---|---|---|---|")
        for n in [int(r) for r in args.rows.split(",")]:
            xs = {m[0].shape[1]: torch.randn(n, m[0].shape[1]) for m in mats}
            ys = {name: [torch.empty(n, m[0].shape[0]) for m in mats] for name in libs}
            for name in libs:  # warm: first touch of the outputs, the thread team
                one_pass(libs[name], mats, xs, ys[name], n, threads)
            times: dict[str, list[float]] = {name: [] for name in libs}
            for i in range(args.repeats):
                for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    times[name].append(one_pass(libs[name], mats, xs, ys[name], n, threads))
            pick = min if args.best else statistics.median
            a, b = (pick(times[name]) * 1000 for name in ("A", "B"))
            same = all(torch.equal(p, q) for p, q in zip(ys["A"], ys["B"], strict=True))
            print(f"| {n} | {a:.2f} | {b:.2f} | {a / b:.2f}× | {'yes' if same else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
