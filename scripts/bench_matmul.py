"""Why a verification pass costs more than one decode step on a CPU: the cost of the decoder's matrix products
against the number of rows (tokens) they run on.

Runs every linear layer of a decoder shaped like the demo's (SmolLM2-135M: 30 layers, hidden 576, MLP 1536,
3 KV heads of 64) on 1..8 rows, two ways with the same weights and the same result:

    x · Wᵀ   what `nn.Linear` computes (`torch.nn.functional.linear`), so what every HF layer runs
    W · xᵀ   the same product, transposed

Weights are fresh random tensors far larger than the CPU caches, so each pass streams them from memory as a
decode step does. Prints milliseconds per pass over all layers (median of --repeats) and the cost relative
to one row through `nn.Linear`.

    .venv/bin/python scripts/bench_matmul.py [--layers 30] [--hidden 576] [--mlp 1536] [--kv 192] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


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


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--kv", type=int, default=192)
    ap.add_argument("--rows", default="1,2,4,6,8")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    weights = layer_weights(args.layers, args.hidden, args.mlp, args.kv)
    mib = sum(w.numel() * w.element_size() for w in weights) / 2**20
    print(
        f"{len(weights)} weights, {mib:.0f} MiB fp32, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    inputs = {w.shape[1]: None for w in weights}
    base = None
    print("| rows | x · Wᵀ (nn.Linear) ms | × one row | W · xᵀ ms | × one row |")
    print("|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        for width in inputs:
            inputs[width] = torch.randn(rows, width)  # [rows, in]
        with torch.inference_mode():
            linear = median_ms(
                lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in weights], args.repeats
            )
            transposed = median_ms(lambda: [torch.mm(w, inputs[w.shape[1]].t()) for w in weights], args.repeats)
        base = base or linear
        print(f"| {rows} | {linear:.1f} | {linear / base:.2f} | {transposed:.1f} | {transposed / base:.2f} |")


if __name__ == "__main__":
    main()
