"""Train the demo's vision tower and projector with the SmolLM2 decoder frozen: `python -m twigvlm.demo.train_vision`.

The stages live in `twigvlm.demo.vision`, one module each: `pretrain` (stage 1, the ViT alone on what is
where), `ground` (stage 1b, visual tokens onto word embeddings) and `align` (stage 2, answers through the
frozen decoder, with a decoder LoRA of rank --lora-rank). This command runs them in order and writes the
result to the package's `demo/assets/` in half precision.

`--recipe` picks the tower's geometry and how the stages train (`twigvlm.demo.recipe`; by default the assets
folder's base, so a plain run rebuilds what ships: v1, 192-px pictures; v2, LLaVA's geometry with context-carrying
tokens and the picture wiped from layer K_f on during alignment); the step, batch
and learning-rate defaults are the recipe's (`DEFAULTS`), any of them can be given. The written vision file
records the recipe, its geometry and the alignment steps done, so `build_demo` rebuilds the same tower.

Every stage checkpoints to --work every --save-every steps (weights, optimizer, schedule, step) and a re-run
continues exactly (each step's batch is a pure function of the step, built by --workers data processes); a
finished stage is skipped. `--budget-min` bounds the whole run's wall clock: a stage that reaches it checkpoints
and stops, and the weights so far are written (their metadata says how many alignment steps they had), so a
re-run — or `--init` from the written files, on another machine — goes on. Prints how long it took. `--device
cuda` trains on a GPU (bf16 autocast).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import TwigVLMError
from ..train.config import resolve_device
from .lora import DecoderLoRA
from .model import (
    ASSETS,
    LORA_WEIGHTS,
    VISION_WEIGHTS,
    build_demo,
    read_lora_weights,
    read_metadata,
    read_vision_weights,
    shipped_recipe,
    vision_state,
)
from .recipe import RECIPES, recipe, recipe_from_metadata
from .vision.align import align
from .vision.ground import ground
from .vision.loop import default_workers
from .vision.pretrain import pretrain

# Each recipe's training defaults. v1's are the shipped run's (an H100, 17.7 min for alignment); v2's are sized for
# one ≤ 9-minute H200 call (docs/demo-model.md gives the measured step times they come from).
DEFAULTS = {
    "v1": dict(pretrain_steps=800, pretrain_batch=32, ground_steps=800, align_steps=3000, align_batch=32, pack=1),
    "v2": dict(pretrain_steps=1200, pretrain_batch=64, ground_steps=0, align_steps=2400, align_batch=8, pack=8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train the demo VLM's vision tower and projector (and decoder LoRA).")
    ap.add_argument(
        "--recipe",
        default=None,
        choices=list(RECIPES),
        help="tower geometry and stages (see module doc; default: the assets folder's base, v1 where there is none)",
    )
    ap.add_argument("--work", type=Path, default=Path("runs/demo-vision"), help="checkpoints (resumable)")
    ap.add_argument("--out", type=Path, default=ASSETS, help="folder for the half-precision weights")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--pretrain-batch", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--ground-steps", type=int, default=None, help="default: the recipe's (v2: 0, no grounding)")
    ap.add_argument("--ground-lr", type=float, default=1e-3)
    ap.add_argument("--align-steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--align-batch", type=int, default=None, help="default: the recipe's")
    ap.add_argument(
        "--pack",
        type=int,
        default=None,
        help="alignment examples packed behind one copy of their picture (then --align-batch counts pictures); "
        "default: the recipe's",
    )
    ap.add_argument(
        "--align-micro",
        type=int,
        default=1,
        help="run each alignment step's pictures in this many parts, one after another, their gradients summed: "
        "the same step in less memory (v2's 6 pictures on a CPU: 9.4 GB at its peak in 2 parts, 12.4 GB in 1)",
    )
    ap.add_argument("--align-lr", type=float, default=1e-3)
    ap.add_argument("--tower-lr-scale", type=float, default=0.3, help="the ViT's lr relative to the projector's")
    ap.add_argument("--lora-rank", type=int, default=16, help="decoder LoRA rank (0: decoder frozen)")
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument(
        "--token-dropout",
        type=float,
        default=None,
        help="share of visual tokens dropped at random during alignment (default: the recipe's, 0; a base trained "
        "with it is easier to prune than an off-the-shelf VLM: say so beside any RelAcc)",
    )
    ap.add_argument(
        "--wipe-share",
        type=float,
        default=None,
        help="share of alignment steps run with the picture wiped from K_f on (default: the recipe's; v2 0.5)",
    )
    ap.add_argument(
        "--budget-min",
        type=float,
        default=None,
        help="wall-clock budget of the whole run, minutes: alignment fits its steps to the time left",
    )
    ap.add_argument(
        "--reserve-min", type=float, default=1.0, help="of the budget, kept for the final validation and writing"
    )
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start alignment from the weights an earlier (budget-stopped) run wrote to this folder, at its step",
    )
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=128, help="val questions per short-answer set at each eval")
    ap.add_argument("--eval-describe", type=int, default=32, help="val descriptions at each eval")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast on a GPU, fp32 on the CPU",
    )
    ap.add_argument("--workers", type=int, default=default_workers(), help="data processes building the batches")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    args.recipe = recipe(args.recipe) if args.recipe else shipped_recipe()
    for key, value in DEFAULTS[args.recipe.name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pack < 1:
        ap.error(f"--pack must be at least 1, got {args.pack}")
    if not 1 <= args.align_micro <= args.align_batch:
        ap.error(f"--align-micro must be between 1 and --align-batch ({args.align_batch}), got {args.align_micro}")
    if args.token_dropout is None:
        args.token_dropout = args.recipe.token_dropout
    if not 0 <= args.token_dropout < 1:
        ap.error(f"--token-dropout must be in [0, 1), got {args.token_dropout}")
    if args.token_dropout != args.recipe.token_dropout:
        args.recipe = dataclasses.replace(args.recipe, token_dropout=args.token_dropout)
    if args.wipe_share is not None:
        if not 0 <= args.wipe_share <= 1:
            ap.error(f"--wipe-share must be in [0, 1], got {args.wipe_share}")
        args.recipe = dataclasses.replace(args.recipe, wipe_share=args.wipe_share)
    args.deadline = time.monotonic() + 60 * args.budget_min if args.budget_min else None
    args.reserve_s = 60 * args.reserve_min
    device = resolve_device(args.device)
    args.device = torch.device(device)
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and device == "cuda")
    return args


def write_assets(
    model: torch.nn.Module, lora: DecoderLoRA | None, out: Path, args: argparse.Namespace, done: int, total: int
) -> None:
    """The shipped files: the vision weights (their metadata: the recipe, its geometry, alignment steps done of how
    many, token dropout), and the LoRA (or no LoRA file when none was trained)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "pt",
        **args.recipe.metadata(),
        "align_step": str(done),
        "align_steps": str(total),
        "token_dropout": str(args.token_dropout),
        "pack": str(args.pack),
        "wipe_share": str(args.recipe.wipe_share),
    }
    save_file(vision_state(model), str(out / VISION_WEIGHTS), metadata=meta)
    if lora is not None:
        save_file(
            lora.state(),
            str(out / LORA_WEIGHTS),
            metadata={"format": "pt", "lora_rank": str(lora.rank), "lora_alpha": str(lora.alpha)},
        )
    elif (out / LORA_WEIGHTS).is_file():
        (out / LORA_WEIGHTS).unlink()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    # random vision weights (or --init's); checkpoints restore
    state = _read_init(args) if args.init is not None else None
    model, processor = build_demo(vision_state=state, seed=args.seed, use_assets=False, recipe=args.recipe)
    model.to(args.device)
    if args.init is None and not (args.work / "align.pt").is_file():
        if not (args.work / "ground.pt").is_file():
            if not pretrain(model, processor, args):
                print("the budget ran out during pre-training (checkpointed): re-run to go on", flush=True)
                return
        if args.ground_steps:
            ground(model, processor, args)
    lora, done, total = align(model, processor, args)
    write_assets(model, lora, args.out, args, done, total)
    state = f"{done} alignment steps" if done >= total else f"stopped at alignment step {done} of {total}"
    print(f"wrote {args.out / VISION_WEIGHTS} ({state}) in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def _read_init(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The vision weights an earlier run wrote to args.init (`build_demo` loads them, checking that none is
    missing); their alignment step goes to `args.init_step` and their LoRA, as trainable starting values, to
    `args.init_lora` (`align` attaches it). A run that stopped short of its schedule's horizon is continued on that
    schedule; one that finished goes on to --align-steps."""
    path = args.init / VISION_WEIGHTS
    if not path.is_file():
        raise TwigVLMError(f"--init {args.init} holds no {VISION_WEIGHTS}")
    meta = read_metadata(path)
    if recipe_from_metadata(meta).metadata() != args.recipe.metadata():
        trained = meta.get("recipe", "v1")
        raise TwigVLMError(f"--init {args.init} holds weights of recipe {trained}, not {args.recipe.name}")
    args.init_lora = read_lora_weights(args.init / LORA_WEIGHTS)[0] if (args.init / LORA_WEIGHTS).is_file() else None
    step, horizon = int(meta.get("align_step", 0)), int(meta.get("align_steps", 0))
    if horizon > step:  # stopped short of its schedule: finish that one
        args.align_steps = horizon
    args.init_step = step
    return read_vision_weights(path)


if __name__ == "__main__":
    import sys

    from ..errors import module_main

    sys.exit(module_main(main, "twigvlm.demo.train_vision"))
