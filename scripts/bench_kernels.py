"""What the CPU kernels change at the level of one engine step: a decode step (1 token), a verification
(γ+1 tokens against the cache), and the prefill, with stock nn.Linear and with the fast kernels, interleaved.

    .venv/bin/python scripts/bench_kernels.py [--model demo] [--rows 6] [--repeats 20] [--threads N]

Prints milliseconds (median over --repeats, each after a fresh prefill of the same prompt) and the verification's
cost in decode steps; the kernel plan (which layout each shape and row count takes) and whether it came
from the cache. The target of the kernel work: a verification of 6 tokens at most 1.15 decode steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import twigvlm
from twigvlm.data.examples import eval_set
from twigvlm.runtime import native
from twigvlm.runtime.kernels import apply_kernels


def step_times(vlm: twigvlm.VLM, rows: int, repeats: int) -> dict[str, float]:
    """Median ms of a prefill, a 1-token step and a `rows`-token step on the same cached prompt."""
    sample = eval_set("describe", 1)[0]
    enc = vlm.encode(sample.question, sample.image())
    engine = vlm.engine
    times: dict[str, list[float]] = {"prefill": [], "decode": [], "verify": []}
    block = torch.randint(0, 1000, (1, rows))
    with torch.inference_mode():
        for _ in range(repeats + 2):
            state = engine.new_state()
            t = time.perf_counter()
            engine.prefill(state, enc)
            times["prefill"].append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.step(state, block[:, :1])
            times["decode"].append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.step(state, block)
            times["verify"].append(time.perf_counter() - t)
    return {k: statistics.median(v[2:]) * 1000 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vlm = twigvlm.load(args.model, kernels="auto")
    plan = vlm.kernel_plan
    source = "cached" if plan.cached else f"probed in {plan.probe_s:.1f} s"
    print(f"threads {torch.get_num_threads()}; kernel plan ({source}):")
    for shape, by_layout in plan.summary().items():
        print(f"  {shape}: " + "; ".join(f"{layout} at rows {rows}" for layout, rows in by_layout.items()))
    if native.gemv_library() is None:
        print(f"  (native kernel unavailable: {native.build_error()})")
    results = {"stock": [], "auto": []}
    for _ in range(3):  # interleaved rounds
        for mode in ("stock", "auto"):
            apply_kernels(vlm.kernel_modules(), mode, plan)
            results[mode].append(step_times(vlm, args.rows, args.repeats // 3 + 1))
    print(f"| kernels | prefill ms | decode ms | verify {args.rows} ms | verify / decode |")
    print("|---|---|---|---|---|")
    for mode, rounds in results.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        print(
            f"| {mode} | {med['prefill']:.1f} | {med['decode']:.1f} | {med['verify']:.1f} | "
            f"{med['verify'] / med['decode']:.2f} |"
        )


if __name__ == "__main__":
    main()
