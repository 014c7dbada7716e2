"""Twig training throughput on this machine: optimizer steps/s and peak memory, for the tiny test model or a
random LLaVA whose decoder has SmolLM2-135M's shape (--smol: 30 layers, hidden 576, MLP 1536, 9 heads / 3 KV
heads, vocab 49152; 144 visual tokens per 192-px image). K=2, T=3 by default; nothing is downloaded.

The data is a generated LLaVA-format set (shape pictures, a question, a long answer). The first --warmup steps
are excluded from the rate; peak memory is the process's peak resident set while training, and how much that
rose above the resident set at the start of training.

    .venv/bin/python scripts/bench_train.py --smol --steps 6 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

import twigvlm
from twigvlm.config import TwigConfig
from twigvlm.tiny.llava import TinySpec, build_tiny_llava, demo_image
from twigvlm.train import TrainConfig, train_twig
from twigvlm.twig.model import grow_twig

SMOL = TinySpec(
    num_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_heads=9,
    num_kv_heads=3,
    vocab_size=49152,
    image_size=192,
    patch_size=16,
    init_std=0.02,
    tie_embeddings=True,
)
WORDS = "the a red blue green circle square star left right above below large small shape near far".split()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class _Clock(TrainerCallback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1, self.rss0 = warmup, 0.0, 0.0, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.rss0 = _rss_mib()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.t0 = time.perf_counter()
        self.t1 = time.perf_counter()


def _data(folder: Path, n: int, size: int, answer_words: int) -> str:
    records = []
    for i in range(n):
        demo_image(folder / f"{i}.png", size=size, seed=i)
        answer = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(answer_words))
        records.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image in detail."},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    (folder / "data.json").write_text(json.dumps(records))
    return str(folder / "data.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smol", action="store_true", help="SmolLM2-135M-shaped decoder instead of the tiny one")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--answer-words", type=int, default=24)
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--T", type=int, default=3)
    ap.add_argument("--distill", default="none", choices=["none", "kl"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    spec = SMOL if args.smol else TinySpec(tie_embeddings=False)
    vlm = twigvlm.VLM.from_model(*build_tiny_llava(spec))
    clock = _Clock(args.warmup)
    with tempfile.TemporaryDirectory(prefix="twigvlm-bench-train-") as tmp:
        data = _data(Path(tmp), args.batch_size * (args.steps + 1), max(spec.image_size, 96), args.answer_words)
        cfg = TrainConfig(
            model="(in memory)",
            data=data,
            out=str(Path(tmp) / "twig"),
            K=args.K,
            T=args.T,
            max_steps=args.steps,
            batch_size=args.batch_size,
            save_steps=10**6,
            logging_steps=10**6,
            distill=args.distill,
            precision=args.precision,
            device="cpu",
        )
        train_twig(cfg, adapter=vlm.adapter, callbacks=[clock])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timed = args.steps - args.warmup
    rate = timed / (clock.t1 - clock.t0)
    trainable = sum(p.numel() for p in grow_twig(vlm.adapter, TwigConfig(K=args.K, T=args.T)).parameters())
    print(
        f"model: {'SmolLM2-135M-shaped' if args.smol else 'tiny test'} decoder ({spec.num_layers} layers, hidden "
        f"{spec.hidden_size}), K={args.K}, T={args.T}, {args.precision}, distill={args.distill}, "
        f"batch {args.batch_size}, {trainable / 1e6:.2f}M trainable parameters"
    )
    print(f"steps/s {rate:.3f}  ({1 / rate:.2f} s/step over {timed} steps after {args.warmup} warm-up)")
    print(f"peak RSS {peak:.0f} MiB; +{peak - clock.rss0:.0f} MiB above the start of training")


if __name__ == "__main__":
    main()
