"""Why a verification pass costs more than one decode step on a CPU: the cost of the decoder's matrix products
against the number of rows (tokens) they run on.

Runs every linear layer of a decoder shaped like the demo's (SmolLM2-135M: 30 layers, hidden 576, MLP 1536,
3 KV heads of 64) on 1..8 rows, two ways with the same weights and the same result:

    x · Wᵀ   what `nn.Linear` computes (`torch.nn.functional.linear`), so what every HF layer runs
    W · xᵀ   the same product, transposed

and on twigvlm's native kernels (`runtime/native.py`, where a C compiler builds them), fp32 and int8 weights:

    native fp32   `native.gemv`: each weight row streamed once for all rows of x
    native int8   `native.gemv_int8` on the weights quantised per output row

Weights are fresh random tensors far larger than the CPU caches, so each pass streams them from memory as a
decode step does. Prints milliseconds per pass over all layers (median of --repeats) and the cost relative
to one row of the same kind; with --head V, the same for an LM head of V rows alone.

    .venv/bin/python scripts/bench_matmul.py [--layers 30] [--hidden 576] [--mlp 1536] [--kv 192] [--repeats 15]
    .venv/bin/python scripts/bench_matmul.py --rows 1,4,8,16 --head 49152
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from twigvlm.runtime import native
from twigvlm.runtime.machine import speed_flags
from twigvlm.runtime.quant import quantize_int8


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
    ap.add_argument("--head", type=int, default=0, metavar="V", help="also an LM head of V rows alone")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    print(f"CPU flags: {speed_flags()}; {torch.get_num_threads()} threads")
    built = native.gemv_library() is not None
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; native kernels: {native.build_error() or built}")
    table(layer_weights(args.layers, args.hidden, args.mlp, args.kv), rows, args.repeats)
    if args.head:
        table([torch.randn(args.head, args.hidden, generator=torch.Generator().manual_seed(1))], rows, args.repeats)


def table(weights: list[torch.Tensor], rows: list[int], repeats: int) -> None:
    """One line per row count: every product over `weights`, each way (ms, and × its one-row time)."""
    mib = sum(w.numel() * w.element_size() for w in weights) / 2**20
    print(f"\n{len(weights)} weights, {mib:.0f} MiB fp32")
    ways: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
        "x · Wᵀ (nn.Linear)": lambda x, i: torch.nn.functional.linear(x, weights[i]),
        "W · xᵀ": lambda x, i: torch.mm(weights[i], x.t()),
    }
    if native.gemv_library() is not None:
        quantized = [quantize_int8(w) for w in weights]
        ways["native fp32"] = lambda x, i: native.gemv(x, weights[i])
        ways["native int8"] = lambda x, i: native.gemv_int8(x, *quantized[i])
    print("| rows | " + " | ".join(f"{name} ms | × one row" for name in ways) + " |")
    print("|---|" + "---|---|" * len(ways))
    first: dict[str, float] = {}
    for n in rows:
        inputs = {w.shape[1]: torch.randn(n, w.shape[1]) for w in weights}  # [n, in] per width
        run = [(i, inputs[w.shape[1]]) for i, w in enumerate(weights)]  # every product's weight index and x
        cells = []
        with torch.inference_mode():
            for name, way in ways.items():
                ms = median_ms(lambda way=way, run=run: [way(x, i) for i, x in run], repeats)
                first.setdefault(name, ms)
                cells.append(f"{ms:.2f} | {ms / first[name]:.2f}")
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
