"""Two builds of twigvlm's native kernels, timed against each other in one process: what a change to
`runtime/csrc/gemv.c` (or a compile-time switch in it) is worth on this machine.

Each build compiles the library's sources as `twigvlm/runtime/native.py` does (the machine's C compiler, -O3,
-march=native, OpenMP): build B with extra flags (`--b=FLAGS`, for example -DSEQ_I8=1 for the in-order prefetch
where a build would not use it), build A with `--a=FLAGS` and, with `--a-src`, from another copy of gemv.c (a file,
or `git:REV` for gemv.c at a revision). Both are loaded and their `twig_gemv_i8` (or `twig_gemv` with --fp32) run
over the weights of a decoder shaped like the demo's (30 layers, hidden 576, MLP 1536, 3 KV heads of 64; random,
far larger than the caches, so each pass streams them from memory as a decode step does), alternating A and B one
pass at a time, so that a busy spell of a shared machine touches both alike. Prints the median ms per pass over all
layers for each number of rows of x, B's speed-up, and whether the two builds' outputs are bit-identical.

    .venv/bin/python scripts/bench_kernel_builds.py --b=-DSEQ_I8=1 [--rows 1,2,3,4,8] [--repeats 21]
    .venv/bin/python scripts/bench_kernel_builds.py --a-src git:HEAD~1 [--fp32]
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
from twigvlm.runtime.quant import quantize_int8

sys.path.insert(0, str(Path(__file__).parent))
from bench_matmul import layer_weights  # noqa: E402 - a sibling script


def build(folder: Path, name: str, gemv_source: str | None, flags: list[str]) -> ctypes.CDLL:
    """The library from its sources (gemv.c replaced by `gemv_source` where given), compiled with `flags` too."""
    cc = native._compiler()
    if cc is None:
        sys.exit("bench_kernel_builds: no C compiler found (set CC, or install gcc or clang)")
    sources = native._sources()
    if gemv_source is not None:
        sources["gemv.c"] = gemv_source.encode()
    path = folder / f"{name}.so"
    error = native.build(cc, sources, [*native._arch_flags(), "-fopenmp", *flags], path)
    if error is not None:
        sys.exit(f"bench_kernel_builds: build {name} failed: {error}")
    return native.load(path)


def gemv_source(spec: str) -> str:
    """gemv.c from a file, or from git (`git:REV`)."""
    if spec.startswith("git:"):
        cmd = ["git", "show", f"{spec[4:]}:twigvlm/runtime/csrc/gemv.c"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if done.returncode != 0:
            sys.exit(f"bench_kernel_builds: {' '.join(cmd)}: {done.stderr.strip()}")
        return done.stdout
    try:
        return Path(spec).read_text()
    except OSError as e:
        sys.exit(f"bench_kernel_builds: cannot read {spec}: {e.strerror}")


def one_pass(
    lib: ctypes.CDLL, mats: list, xs: dict[int, torch.Tensor], ys: list[torch.Tensor], n: int, threads: int
) -> float:
    """Every product once with `lib`: x [n, in] (by width) into ys; returns the seconds."""
    t0 = time.perf_counter()
    for (w, s), y in zip(mats, ys, strict=True):
        x, d_out, d_in = xs[w.shape[1]], w.shape[0], w.shape[1]
        if s is None:
            lib.twig_gemv(x.data_ptr(), w.data_ptr(), None, y.data_ptr(), n, d_in, d_out, threads)
        else:
            lib.twig_gemv_i8(x.data_ptr(), w.data_ptr(), s.data_ptr(), None, y.data_ptr(), n, d_in, d_out, threads)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a-src", default=None, metavar="FILE|git:REV", help="build A's gemv.c (default: this tree's)")
    ap.add_argument("--a", default="", metavar="FLAGS", help="build A's extra compiler flags")
    ap.add_argument("--b", default="", metavar="FLAGS", help="build B's extra compiler flags")
    ap.add_argument("--fp32", action="store_true", help="fp32 weights (twig_gemv) instead of int8 (twig_gemv_i8)")
    ap.add_argument("--rows", default="1,2,3,4,8")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    print(f"CPU flags: {speed_flags()}; {threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        a_src = None if args.a_src is None else gemv_source(args.a_src)
        libs = {"A": build(Path(tmp), "a", a_src, args.a.split()), "B": build(Path(tmp), "b", None, args.b.split())}
        weights = layer_weights(args.layers, 576, 1536, 192)
        if args.fp32:
            mats = [(w.contiguous(), None) for w in weights]
        else:
            mats = [quantize_int8(w) for w in weights]
        print(f"A: gemv.c {args.a_src or 'of this tree'} {args.a}; B: this tree's {args.b}; "
              f"{'fp32' if args.fp32 else 'int8'} weights, {len(mats)} products")  # fmt: skip
        print("| rows | A ms | B ms | A / B | identical |")
        print("|---|---|---|---|---|")
        for n in [int(r) for r in args.rows.split(",")]:
            xs = {w.shape[1]: torch.randn(n, w.shape[1]) for w, _ in mats}
            ys = {name: [torch.empty(n, w.shape[0]) for w, _ in mats] for name in libs}
            for name in libs:  # warm: first touch of the outputs, the thread team
                one_pass(libs[name], mats, xs, ys[name], n, threads)
            times: dict[str, list[float]] = {name: [] for name in libs}
            for i in range(args.repeats):
                for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    times[name].append(one_pass(libs[name], mats, xs, ys[name], n, threads))
            a, b = (statistics.median(times[name]) * 1000 for name in ("A", "B"))
            same = all(torch.equal(p, q) for p, q in zip(ys["A"], ys["B"], strict=True))
            print(f"| {n} | {a:.2f} | {b:.2f} | {a / b:.2f}× | {'yes' if same else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
