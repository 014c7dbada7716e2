"""Train the twigs of the paper's T and initialisation ablation on the demo model, with equal training for each
(default 250 steps of 8 examples from the demo's twig training set, lr 2e-4, CE), then compare them with

    twigvlm bench --model demo --twig runs/ablate/T3-next,runs/ablate/T1-next,... --ablation twig

Each twig goes to WORK/T{T}-{init}; a finished one is skipped and an interrupted one resumes from its newest
checkpoint, so the script can be stopped and started again. The training set is the one
`python -m twigvlm.demo.build` writes (WORK/../demo/twig-data); it is written here when missing.

    .venv/bin/python scripts/train_ablation_twigs.py [--steps 250] [--twigs 3:next,1:next,3:last,3:random]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from twigvlm.demo.build import TWIG_VAL_EXAMPLES, build_twig_data
from twigvlm.train.config import TrainConfig
from twigvlm.train.recipe import train_twig
from twigvlm.twig.model import CONFIG_NAME


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/ablate"))
    ap.add_argument("--data-work", type=Path, default=Path("runs/demo"), help="where the twig data lives")
    ap.add_argument(
        "--twigs",
        default="3:next,1:next,3:last,3:random,2:next,4:next",
        help="comma-separated T:init (init: next, last or random)",
    )
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    data, val = build_twig_data(args.data_work, 8000, TWIG_VAL_EXAMPLES, seed=0)
    for spec in args.twigs.split(","):
        T, init = spec.split(":")
        out = args.work / f"T{T}-{init}"
        if (out / CONFIG_NAME).is_file():
            print(f"{out}: done already", flush=True)
            continue
        t0 = time.perf_counter()
        cfg = TrainConfig(
            model="demo",
            data=str(data),
            eval_data=str(val),
            out=str(out),
            K=2,
            T=int(T),
            layer_init=init,
            head="shared",
            max_steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            save_steps=max(1, args.steps // 2),
            eval_steps=args.steps,
            logging_steps=25,
            save_dtype="bfloat16",
            draft_vocab=1024,
            device=args.device,
            resume=any(out.glob("checkpoint-*")),
        )
        result = train_twig(cfg)
        print(
            f"{out}: agreement {result.eval_after.get('eval_agreement', float('nan')):.3f} "
            f"({(time.perf_counter() - t0) / 60:.1f} min)",
            flush=True,
        )


if __name__ == "__main__":
    main()
