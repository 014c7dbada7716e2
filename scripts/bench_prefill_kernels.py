"""Time to the first token on the demo with the many-row kernel (`native.gemm`, `csrc/gemm.c`) against what the
same products ran before it: MKL's `nn.Linear` where the kernel plan picked the kernel, and for int8 weights the
dequantised weight's product. The same loaded model and plan both ways, only those products swapped, the two
alternating request by request; plain prefill and TTP (keep 1/9).

    .venv/bin/python scripts/bench_prefill_kernels.py [--quantize int8] [--repeats 15] [--threads 2]

Prints the kernel plan's choices, then per case the median and the fastest of --repeats (on a machine whose host
lends out its cores' time, noise only adds: the fastest is the steadier figure) and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import twigvlm
from twigvlm import PruneConfig
from twigvlm.data.examples import scene_description
from twigvlm.runtime import native, quant
from twigvlm.runtime.machine import speed_flags

# The products the many-row kernels replaced: nn.Linear's, and the dequantised int8 weight's.
BEFORE: dict[str, Callable] = {
    "gemm": lambda x, w, b=None: F.linear(x, w, b),
    "gemm_int8": lambda x, q, s, b=None: F.linear(x, quant.dequantize(q, s, x.dtype), b),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantize", default="none", choices=["none", "int8"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU flags: {speed_flags()}; {args.threads} threads; weights {args.quantize}")
    if native.gemv_library() is None:
        raise SystemExit(f"bench_prefill_kernels: the native kernels are not built here: {native.build_error()}")
    vlm = twigvlm.load("demo", twig="demo", quantize=args.quantize)
    print("kernel plan (layout: row counts):", vlm.kernel_plan.summary() if vlm.kernel_plan else "none")
    sample = scene_description("test", 0)
    image = sample.image()
    ways = {"before": BEFORE, "gemm": {"gemm": native.gemm, "gemm_int8": native.gemm_int8}}
    cases = {"plain": None, "TTP 1/9": PruneConfig(method="twig", keep_ratio=1 / 9)}

    def ttft(way: str, prune: PruneConfig | None) -> float:
        for name, fn in ways[way].items():
            setattr(native, name, fn)
        t0 = time.perf_counter()
        vlm.generate(sample.question, image=image, max_new_tokens=1, prune=prune)
        return (time.perf_counter() - t0) * 1000

    times: dict[tuple[str, str], list[float]] = {(c, w): [] for c in cases for w in ways}
    try:
        for prune in cases.values():
            for way in ways:
                ttft(way, prune)  # warm-up
        for r in range(args.repeats):
            for case, prune in cases.items():
                for way in ways if r % 2 == 0 else reversed(ways):
                    times[(case, way)].append(ttft(way, prune))
    finally:
        for name, fn in ways["gemm"].items():
            setattr(native, name, fn)
    print("| case | before: median ms | fastest | many-row kernel: median ms | fastest | speed-up (fastest) |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        a, b = times[(case, "before")], times[(case, "gemm")]
        cells = f"{statistics.median(a):.0f} | {min(a):.0f} | {statistics.median(b):.0f} | {min(b):.0f}"
        print(f"| {case} | {cells} | {min(a) / min(b):.2f}× |")


if __name__ == "__main__":
    main()
