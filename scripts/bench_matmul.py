"""Why a verification pass costs more than one decode step on a CPU: the cost of the decoder's matrix products
against the number of rows (tokens) they run on.

Runs every linear layer of a decoder shaped like the demo's (SmolLM2-135M: 30 layers, hidden 576, MLP 1536,
3 KV heads of 64) on 1..8 rows, two ways with the same weights and the same result:

    x · Wᵀ   what `nn.Linear` computes (`torch.nn.functional.linear`), so what every HF layer runs
    W · xᵀ   the same product, transposed

and on twigvlm's native kernels (`runtime/native.py`, where a C compiler builds them), fp32 and int8 weights:

    native fp32   `native.gemv`: each weight row streamed once for all rows of x
    native int8   `native.panel_int8` on the weights quantised per output row (stored in panels)
    gemm fp32 / gemm int8   `native.gemm` / `native.gemm_int8`, the many-row kernel (a prompt's rows)
    lanes fp32   `native.gemm_lanes`, the many-row kernel's tiles summing in native fp32's order (a step's rows)
    int8 dequantised · nn.Linear   what int8 weights ran over a prompt's rows before the many-row kernel

Weights are fresh random tensors far larger than the CPU caches, so each pass streams them from memory as a
decode step does; the ways alternate pass by pass, so that a busy spell of a shared machine touches all alike.
Prints milliseconds per pass over all layers (median of --repeats) and the cost relative to one row of the same
kind, or with --prompt (rows 16, 64, 170, 512 by default) milliseconds and GFLOP/s (--best: the fastest pass
instead of the median); with --head V, the same for an LM head of V rows alone.

    .venv/bin/python scripts/bench_matmul.py [--layers 30] [--hidden 576] [--mlp 1536] [--kv 192] [--repeats 15]
    .venv/bin/python scripts/bench_matmul.py --rows 1,4,8,16 --head 49152
    .venv/bin/python scripts/bench_matmul.py --prompt --repeats 15 --best
    .venv/bin/python scripts/bench_matmul.py --prompt --rows 16,32,64,104 --head 49152 --best
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from twigvlm.runtime import native
from twigvlm.runtime.machine import speed_flags
from twigvlm.runtime.quant import dequantize, quantize_int8, to_panels


def layer_weights(n_layers: int, hidden: int, mlp: int, kv: int) -> list[torch.Tensor]:
    """Every linear weight [out, in] of n_layers Llama layers (q, k, v, o, gate, up, down)."""
    g = torch.Generator().manual_seed(0)
    shapes = [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (mlp, hidden),
        (mlp, hidden),
        (hidden, mlp),
    ]
    return [torch.randn(*s, generator=g) for _ in range(n_layers) for s in shapes]


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, best: bool = False) -> dict[str, float]:
    """Each of `fns` timed `repeats` times after a warm-up, alternating pass by pass: the medians in ms (with
    `best`, the fastest: on a machine whose host lends out its cores' time, noise only adds)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(t) if best else statistics.median(t)) * 1000 for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--kv", type=int, default=192)
    ap.add_argument("--rows", default=None, help="row counts (default 1,2,4,6,8; with --prompt 16,64,170,512)")
    ap.add_argument("--prompt", action="store_true", help="a prompt's row counts: the many-row kernels beside MKL")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--head", type=int, default=0, metavar="V", help="also an LM head of V rows alone")
    ap.add_argument("--best", action="store_true", help="the fastest of the repeats instead of their median")
    args = ap.parse_args()
    rows = [int(r) for r in (args.rows or ("16,64,170,512" if args.prompt else "1,2,4,6,8")).split(",")]
    print(f"CPU flags: {speed_flags()}; {torch.get_num_threads()} threads")
    built = native.gemv_library() is not None
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; native kernels: {native.build_error() or built}")
    how = dict(repeats=args.repeats, prompt=args.prompt, best=args.best)
    table(layer_weights(args.layers, args.hidden, args.mlp, args.kv), rows, **how)
    if args.head:
        head = [torch.randn(args.head, args.hidden, generator=torch.Generator().manual_seed(1))]
        table(head, rows, **how)


def table(weights: list[torch.Tensor], rows: list[int], repeats: int, prompt: bool = False, best: bool = False) -> None:
    """One line per row count: every product over `weights`, each way (ms, and × its one-row time, or with
    `prompt` GFLOP/s)."""
    mib = sum(w.numel() * w.element_size() for w in weights) / 2**20
    print(f"\n{len(weights)} weights, {mib:.0f} MiB fp32")
    ways: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
        "x · Wᵀ (nn.Linear)": lambda x, i: torch.nn.functional.linear(x, weights[i]),
    }
    if not prompt:
        ways["W · xᵀ"] = lambda x, i: torch.mm(weights[i], x.t())
    if native.gemv_library() is not None:
        quantized = [(to_panels(q), s) for q, s in map(quantize_int8, weights)]
        ways["native fp32"] = lambda x, i: native.gemv(x, weights[i])
        if prompt:
            ways["gemm fp32"] = lambda x, i: native.gemm(x, weights[i])
            ways["lanes fp32"] = lambda x, i: native.gemm_lanes(x, weights[i])
            ways["int8 dequantised · nn.Linear"] = lambda x, i: torch.nn.functional.linear(x, dequantize(*quantized[i]))
        ways["native int8"] = lambda x, i: native.panel_int8(x, *quantized[i])
        if prompt:
            ways["gemm int8"] = lambda x, i: native.gemm_int8(x, *quantized[i])
    unit = "GFLOP/s" if prompt else "× one row"
    print("| rows | " + " | ".join(f"{name} ms | {unit}" for name in ways) + " |")
    print("|---|" + "---|---|" * len(ways))
    first: dict[str, float] = {}
    flops = 2 * sum(w.numel() for w in weights)  # per row
    for n in rows:
        inputs = {w.shape[1]: torch.randn(n, w.shape[1]) for w in weights}  # [n, in] per width
        run = [(i, inputs[w.shape[1]]) for i, w in enumerate(weights)]  # every product's weight index and x
        with torch.inference_mode():
            passes = {name: (lambda way=way, run=run: [way(x, i) for i, x in run]) for name, way in ways.items()}
            ms = median_ms(passes, repeats, best)
        cells = []
        for name in ways:
            first.setdefault(name, ms[name])
            rate = f"{n * flops / ms[name] / 1e6:.0f}" if prompt else f"{ms[name] / first[name]:.2f}"
            cells.append(f"{ms[name]:.2f} | {rate}")
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
