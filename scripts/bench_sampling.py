"""Sampling with drafts: positional against sequential randomness on the demo VLM — acceptance and speed.

For each description picture and seed, interleaved: plain sampling and SSD without pruning (the drafter named,
with its default settings) under each kind of randomness (`GenConfig.sampling`). It reports each drafted run's
acceptance, tokens per verification and decode speed against the plain run of the same kind, and checks what
positional sampling promises: the drafted ids equal the plain ones, seed by seed.

    python scripts/bench_sampling.py --pictures 4 --seeds 3 --temperature 0.7 --threads 2
"""

from __future__ import annotations

import argparse
import statistics

import torch

import twigvlm
from twigvlm import SpecConfig
from twigvlm.bench.tasks import builtin
from twigvlm.runtime.machine import cpuinfo_line, speed_flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pictures", type=int, default=4, help="description pictures (the test split's first)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--draft", default="chain", choices=["chain", "tree", "auto"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vlm = twigvlm.load("demo", twig="demo")
    spec = SpecConfig(draft=args.draft)  # its default settings (a chain's γ and τ)
    samples = builtin("describe", args.pictures)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, ignore_eos=True)
    vlm.generate(samples[0].prompt, samples[0].image(), max_new_tokens=4, speculative=spec)  # warm-up
    rows: dict[str, list] = {kind: [] for kind in ("positional", "sequential")}
    same = total = 0
    for sample in samples:
        image = sample.image()
        for seed in range(args.seeds):
            for kind in ("positional", "sequential"):  # interleaved
                plain = vlm.generate(sample.prompt, image, seed=seed, sampling=kind, **gen)
                drafted = vlm.generate(sample.prompt, image, seed=seed, sampling=kind, speculative=spec, **gen)
                s = drafted.stats
                speed = s.tokens_per_s / plain.stats.tokens_per_s if plain.stats.tokens_per_s else float("nan")
                rows[kind].append((s.acceptance_rate or 0.0, s.tokens_per_verification or 1.0, speed))
                if kind == "positional":
                    total += 1
                    same += drafted.token_ids == plain.token_ids
    cpu = (cpuinfo_line("model name") or "?").split(":")[-1].strip()
    print(
        f"demo, describe ×{args.pictures} × {args.seeds} seeds, temperature {args.temperature}, top-p {args.top_p}, "
        f"{args.max_new_tokens} tokens, drafter {args.draft}, {torch.get_num_threads()} threads; "
        f"{cpu} ({speed_flags()})"
    )
    print(f"{'sampling':<11} {'acceptance':>10} {'tokens/verification':>20} {'× plain decode (median)':>24}")
    for kind, values in rows.items():
        acc, tpv = (statistics.mean(v[i] for v in values) for i in range(2))
        speed = statistics.median(v[2] for v in values)
        print(f"{kind:<11} {acc:>10.3f} {tpv:>20.2f} {speed:>23.2f}×")
    print(f"positional: drafted ids equal the plain ids on {same} of {total} (picture, seed) pairs")


if __name__ == "__main__":
    main()
