"""Batched generation against the same requests one after another: aggregate tokens/s at batch sizes 1, 4, 8.

    python scripts/bench_batch.py                       # the demo model, 8 scene descriptions, 64 tokens each
    python scripts/bench_batch.py --sizes 1,2,4,8,16 --tokens 32
    python scripts/bench_batch.py --speculative         # drafting requests, batched and one after another
    python scripts/bench_batch.py --sweep --sizes 1,2,4,8,16   # where drafting stops paying as the batch grows
    python scripts/bench_batch.py --sweep --sizes 1,2,4,8 --trees 6:3:2,12:4:4   # chains against draft trees

Each size runs its requests one at a time (`vlm.generate(prompt, ...)` per request) and then as one list
(`vlm.generate([...])`), after a warm-up, and checks that both give the same token ids. Prints the machine's
CPU flags with the figures.

--sweep times decode steps alone (no prefill): for each batch size, every row a drafting request (auto, the
demo twig), 12 steps at each forced plan after 3 untimed ones — each draft length γ (0: no drafting) and each
draft tree N:D:k of --trees (N nodes, D deep, top-k) —, reporting tokens per step and tokens/s, and the plan auto
picks for that batch from its calibrated costs.
"""

from __future__ import annotations

import argparse
import time

import torch

from twigvlm.api import VLM
from twigvlm.config import GenConfig, SpecConfig
from twigvlm.data.examples import IMAGE_SIZE
from twigvlm.data.scenes import DESCRIBE, make_scene, scene_seed
from twigvlm.generation import batch as batch_module
from twigvlm.generation.batch_draft import Plan
from twigvlm.runtime.machine import speed_flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", default="off", choices=["auto", "on", "off"])
    ap.add_argument("--quantize", default="none", choices=["none", "int8"])
    ap.add_argument("--kernels", default="auto", choices=["auto", "products", "stock"], help="products: stock layers")
    ap.add_argument("--speculative", action="store_true", help="every request drafts (auto)")
    ap.add_argument("--sweep", action="store_true", help="decode steps at forced draft lengths per batch size")
    ap.add_argument("--gammas", default="0,1,2,3,4", help="the draft lengths --sweep forces")
    ap.add_argument("--trees", default="", help="the draft trees --sweep forces, N:D:k each (comma-separated)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    vlm = VLM.load("demo", twig="demo", compile=args.compile, quantize=args.quantize, kernels=args.kernels)
    requests = [
        dict(prompt=DESCRIBE, image=make_scene(scene_seed("test", i)).render(IMAGE_SIZE), max_new_tokens=args.tokens,
             ignore_eos=True, speculative=args.speculative or args.sweep)
        for i in range(max(sizes))
    ]  # fmt: skip
    if args.sweep:
        plans = [Plan("chain", int(g)) if int(g) else None for g in args.gammas.split(",")]
        for tree in filter(None, args.trees.split(",")):
            n, d, k = (int(x) for x in tree.split(":"))
            plans.append(Plan("tree", d, n, k))
        sweep(vlm, requests, sizes, plans, args.threads, f"kernels {args.kernels}, compile {args.compile}")
        return
    vlm.generate(requests[:2])  # warm-up: both paths
    vlm.generate(DESCRIBE, image=requests[0]["image"], max_new_tokens=4)
    print(f"CPU flags: {speed_flags()}; threads {args.threads}; compile {args.compile}; weights {args.quantize}")
    for n in sizes:
        t = time.perf_counter()
        alone = [vlm.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in requests[:n]]
        seq = time.perf_counter() - t
        t = time.perf_counter()
        together = vlm.generate(requests[:n])
        bat = time.perf_counter() - t
        same = all(a.token_ids == b.token_ids for a, b in zip(alone, together, strict=True))
        tokens = sum(len(r.token_ids) for r in together)
        print(
            f"batch {n:2d}: one after another {tokens / seq:6.1f} tokens/s, together {tokens / bat:6.1f} tokens/s "
            f"({seq / bat:.2f}×), identical: {same}"
        )


def describe(plan: Plan | None) -> str:
    if plan is None:
        return "none"
    return f"γ = {plan.depth}" if plan.kind == "chain" else f"tree {plan.nodes}:{plan.depth}:{plan.topk}"


def sweep(
    vlm: VLM, requests: list[dict], sizes: list[int], plans: list[Plan | None], threads: int, settings: str
) -> None:
    """Steady-state decode steps of batches of drafting rows under forced plans (see the module docstring)."""
    vlm.generate(requests[:2])  # warm-up, and auto's costs measured
    record = vlm.draft_record(vlm.twig)
    encoded = [vlm.encode(r["prompt"], r["image"]) for r in requests]
    real = batch_module.batch_plan
    print(f"CPU flags: {speed_flags()}; threads {threads}; {settings}; decode steps only (no prefill)")
    print("| rows | " + " | ".join(describe(p) for p in plans) + " | auto's plan |")
    print("|---|" + "---|" * (len(plans) + 1))
    for n in sizes:
        cells, auto = [], "own drafter"
        for plan in plans:
            batch_module.batch_plan = lambda *a, plan=plan, **k: (plan, None)  # noqa: B023 - (None: not auto's, uncalibrated)
            session = batch_module.BatchSession(vlm.engine, n, record)
            cfg = GenConfig(max_new_tokens=10_000, ignore_eos=True)
            for enc in encoded[:n]:
                session.add(enc, cfg, None, SpecConfig(draft="auto"))
            for _ in range(3):
                session.step()
            before, t = sum(len(r.ids) for r in session.active), time.perf_counter()
            for _ in range(12):
                session.step()
            seconds, tokens = time.perf_counter() - t, sum(len(r.ids) for r in session.active) - before
            cells.append(f"{tokens / seconds:.1f} tok/s ({tokens / 12:.1f}/step)")
            batch_module.batch_plan = real
            if n > 1:  # what auto would pick for this batch now, from its calibrated costs (no exploring step)
                session.together_steps = 0
                auto = describe(next((p for p in session._plans(session.active)[0] if p), None))
        print(f"| {n} | " + " | ".join(cells) + f" | {auto} |", flush=True)


if __name__ == "__main__":
    main()
