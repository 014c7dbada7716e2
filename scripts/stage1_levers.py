"""Which stage-1 settings let the demo tower tell shapes apart? Stage 1 of the demo's vision training from scratch
under each named setting, for the same steps and pictures, then what its read-outs get right on 128 val scenes
(`vision.pretrain.probe`: each occupied cell's colour, shape and size, "empty", and the picture-level bits' F1 from
one token and from the pool). Minutes a setting on a CPU, so a lever is chosen by measurement before hours of
alignment are spent on a tower that cannot see it.

A setting is `name` or `name:key=value,...` over the recipe's fields (`patch_weight`, `context_weight`, …) and
`lr` (stage 1's learning rate):

    python scripts/stage1_levers.py --steps 250 --batch 32 \\
        --settings v2 patch:patch_weight=1 cells-only:context_weight=0 --out runs/stage1-levers.json

Each setting trains in WORK/<name> (checkpoints every 100 steps: a re-run continues).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from twigvlm.demo.model import build_demo
from twigvlm.demo.recipe import recipe
from twigvlm.demo.train_vision import parse_args
from twigvlm.demo.vision import pretrain as stage1
from twigvlm.demo.vision.evaluation import format_scores
from twigvlm.runtime.machine import speed_flags


def parse_setting(text: str, base: str) -> tuple[str, object, float | None]:
    """'name:key=value,...' → (name, the base recipe with those fields replaced, lr or None)."""
    name, _, rest = text.partition(":")
    r, lr, fields = recipe(base), None, [f.name for f in dataclasses.fields(recipe(base))]
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "lr":
            lr = float(value)
        elif key in fields:
            kind = type(getattr(r, key))
            r = dataclasses.replace(r, **{key: value.lower() in ("1", "true") if kind is bool else kind(value)})
        else:
            raise SystemExit(f"unknown field {key!r} in setting {text!r}: use lr or one of {', '.join(fields)}")
    return name, r, lr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="v2", help="the recipe every setting starts from")
    ap.add_argument("--settings", nargs="+", default=["v2", "patch:patch_weight=1"])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--work", type=Path, default=Path("runs/stage1-levers"))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    settings = [parse_setting(s, a.recipe) for s in a.settings]
    report: dict = {"cpu_flags": speed_flags(), "steps": a.steps, "batch": a.batch, "settings": {}}
    for name, r, lr in settings:
        argv = ["--recipe", a.recipe, "--precision", a.precision, "--workers", "1", "--work", str(a.work / name)]
        argv += ["--pretrain-steps", str(a.steps), "--pretrain-batch", str(a.batch), "--eval-every", "0"]
        args = parse_args(argv + (["--pretrain-lr", str(lr)] if lr else []))
        args.recipe = r
        args.work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model, processor = build_demo(use_assets=False, recipe=r, progress=False)
        t = time.perf_counter()
        scores = stage1.pretrain(model, processor, args)  # its closing probe (the run has no time budget)
        row = {"train_s": round(time.perf_counter() - t), "lr": args.pretrain_lr}
        row |= {k: v for k, v in dataclasses.asdict(r).items() if v != getattr(recipe(a.recipe), k)}
        row["probe"] = {k: round(v, 3) for k, v in scores.items()}
        report["settings"][name] = row
        print(f"{name}: {format_scores(row['probe'])} ({row['train_s']} s)", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
