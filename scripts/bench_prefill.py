"""Prefill time with visual-token pruning: none / fastv / visionzip / twig, interleaved, medians.

A random LLaVA whose decoder has SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads, vocab
49152) and 144 visual tokens per image (192-px images, 16-px patches; --image-size 384 gives LLaVA-1.5's 576),
with a twig grown at K=2, T=3. Prefill = vision encode + prompt prefill up to the first token's logits.
Nothing is downloaded.

    .venv/bin/python scripts/bench_prefill.py --keep-ratio 0.111 --repeats 7 --dtype float32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import twigvlm
from twigvlm import PruneConfig
from twigvlm.inputs.images import load_image
from twigvlm.tiny.llava import TinySpec, build_tiny_llava, demo_image

METHODS = ("none", "fastv", "visionzip", "twig")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--keep-ratio", type=float, default=1 / 9)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--image-size", type=int, default=192, help="192 → 144 visual tokens; 384 → 576 (LLaVA-1.5)")
    args = ap.parse_args()
    spec = TinySpec(
        num_layers=30,
        hidden_size=576,
        num_heads=9,
        num_kv_heads=3,
        vocab_size=49152,
        image_size=args.image_size,
        patch_size=16,
        init_std=0.02,
        tie_embeddings=True,
    )
    num_visual = (args.image_size // 16) ** 2
    model, processor = build_tiny_llava(spec)
    vlm = twigvlm.VLM.from_model(model.to(getattr(torch, args.dtype)), processor)
    vlm.grow_twig(K=2, T=3)
    image = load_image(demo_image("/tmp/twigvlm-bench-prefill.png", size=spec.image_size))
    prompt = "What is the color of the largest shape in the picture, and where is it?"
    configs = {m: PruneConfig(m, keep_ratio=args.keep_ratio) for m in METHODS if m != "none"}
    configs["none"] = None

    def prefill(method: str) -> tuple[float, int | None]:
        t = time.perf_counter()
        out = vlm.generate(prompt, image=image, max_new_tokens=1, prune=configs[method])
        return time.perf_counter() - t, out.stats.kept

    for m in METHODS:  # warm-up
        prefill(m)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    kept: dict[str, int | None] = {}
    for _ in range(args.repeats):
        for m in METHODS:
            dt, kept[m] = prefill(m)
            times[m].append(dt)
    base = statistics.median(times["none"])
    print(
        f"prefill, {spec.num_layers}-layer decoder (hidden {spec.hidden_size}), {args.dtype}, "
        f"{num_visual} visual tokens, keep-ratio {args.keep_ratio:.3f}, {torch.get_num_threads()} threads, "
        f"{args.repeats} interleaved repeats"
    )
    print("| method | kept R' | median prefill (ms) | min–max (ms) | × unpruned |")
    print("|---|---|---|---|---|")
    for m in METHODS:
        med = statistics.median(times[m])
        print(
            f"| {m} | {kept[m] if kept[m] is not None else num_visual} | {med * 1000:.1f} | "
            f"{min(times[m]) * 1000:.1f}–{max(times[m]) * 1000:.1f} | {med / base:.2f} |"
        )


if __name__ == "__main__":
    main()
