"""Build the demo model's shipped parts from nothing: `python -m twigvlm.demo.build`.

1. The vision tower and projector (`twigvlm.demo.train_vision --recipe`: pre-training, grounding (v1),
   alignment; resumable) → assets/vision.safetensors.
2. The twig (K=2, T=3, shared head, layers initialised from the last 3 base layers: on this base they draft
   and prune better than the paper's K+1..K+T, see the twig ablation in docs/results.md) with the training recipe
   (`twigvlm train`) on a LLaVA-format set written from the training mixture, evaluated on val → assets/twig
   (bf16). The twig records FinalWipe after layer 26 (`--wipe-layer`), where this base stops reading the image.
3. The twig's pruning head (`twigvlm train --objective pruning`: TwigVLM++'s P-Head distilled from base layer
   `--head-teacher-layer`'s attention to the visual tokens, the twig frozen) on another 1,200 examples of the
   mixture → added to assets/twig (`--prune-head pruning` selects with it).

Every stage resumes from its checkpoints under --work, so an interrupted build continues where it stopped; a
finished stage is skipped. Prints how long each stage took. On a GPU pass `--device cuda`; options this
command does not know go to `twigvlm.demo.train_vision` (e.g. `--align-steps 800 --lora-rank 0`).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from ..config import LAYER_INITS
from ..data.examples import eval_set, training_stream, write_llava
from ..errors import TwigVLMError
from ..train.config import TrainConfig, resolve_device
from ..train.prune_head import train_prune_head
from ..train.recipe import clear_unfinished, train_twig
from ..twig.model import CONFIG_NAME, copy_twig, read_twig_config
from . import train_vision
from .model import ASSETS, ASSETS_ENV, TWIG_DIR, VISION_WEIGHTS, read_metadata, shipped_recipe
from .recipe import RECIPES, V2, recipe_from_metadata
from .vision.loop import default_workers

# Per recipe: the K_f the twig records and the base layer the pruning head learns from. v1 still reads the picture in
# layers 24-26 (the wipe ablation), so its twig wipes after 26 and its head learns from 24 (18, round(0.6·L),
# measured a tie: 10 : 9); v2's alignment wiped the picture from round(0.75·L) = 23 on, so the paper's K_f holds and
# the head learns from round(0.6·L) = 18, a layer that reads the picture.
TWIG_WIPE = {"v1": 26, "v2": V2.wipe_layer}
HEAD_TEACHER = {"v1": 24, "v2": 18}
TWIG_VAL_EXAMPLES = 120  # the twig's val set: a third each of scenes, easy-VQA and descriptions


def build_twig_data(work: Path, n_train: int, n_eval: int, seed: int, workers: int = 0) -> tuple[Path, Path]:
    """The twig's LLaVA-format training set (from the mixture, another seed than the vision run's) and val set."""
    train_dir, eval_dir = work / "twig-data" / "train", work / "twig-data" / "val"
    if not (train_dir / "data.json").is_file():
        write_llava(train_dir, list(itertools.islice(training_stream(seed + 1), n_train)), workers)
    if not (eval_dir / "data.json").is_file():
        per = max(1, n_eval // 3)
        write_llava(
            eval_dir,
            eval_set("scenes", per, "val") + eval_set("easyvqa", per, "val") + eval_set("describe", per, "val"),
        )
    return train_dir / "data.json", eval_dir / "data.json"


def build_head_data(work: Path, n_train: int, seed: int, workers: int = 0) -> tuple[Path, Path]:
    """The pruning head's training set (another seed of the mixture) and val set (50 of each val set)."""
    train_dir, eval_dir = work / "head-data" / "train", work / "head-data" / "val"
    if not (train_dir / "data.json").is_file():
        write_llava(train_dir, list(itertools.islice(training_stream(seed + 7), n_train)), workers)
    if not (eval_dir / "data.json").is_file():
        write_llava(
            eval_dir, eval_set("scenes", 50, "val") + eval_set("easyvqa", 50, "val") + eval_set("describe", 50, "val")
        )
    return train_dir / "data.json", eval_dir / "data.json"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the demo model's vision tower, projector and twig.")
    ap.add_argument("--work", type=Path, default=Path("runs/demo"))
    ap.add_argument("--twig-examples", type=int, default=8000)
    ap.add_argument("--twig-epochs", type=float, default=1.0)
    ap.add_argument("--twig-batch", type=int, default=8)
    ap.add_argument("--twig-lr", type=float, default=2e-4)
    ap.add_argument("--draft-vocab", type=int, default=1024, help="the twig drafts among this many answer tokens")
    ap.add_argument("--distill", default="none", choices=["none", "kl"])
    ap.add_argument(
        "--layer-init",
        default="last",
        choices=list(LAYER_INITS),
        help="where the twig's layers start (the twig ablation in docs/results.md picked 'last' for the demo)",
    )
    ap.add_argument(
        "--recipe",
        default=None,
        choices=list(RECIPES),
        help="the vision recipe (train_vision's; default: the assets folder's base, v1 where there is none)",
    )
    ap.add_argument(
        "--wipe-layer",
        type=int,
        default=None,
        help="the FinalWipe layer K_f the twig records (default: the recipe's, v1 26 — the wipe ablation in "
        "docs/results.md: v1 still reads the image in layers 24-26 — v2 23, round(0.75·L))",
    )
    ap.add_argument("--head-examples", type=int, default=1200, help="the pruning head's training examples")
    ap.add_argument(
        "--head-teacher-layer",
        type=int,
        default=None,
        help="the base layer the pruning head learns from (default: the recipe's, v1 24, v2 18)",
    )
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="every stage's (auto: bf16 autocast on a GPU, fp32 on the CPU; bf16 pays on a CPU with AVX-512 BF16)",
    )
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--data-only",
        action="store_true",
        help="write the twig's and the pruning head's data sets under --work and stop (they do not depend on the "
        "base: a GPU job writes them while its decoder is still arriving)",
    )
    args, vision_argv = ap.parse_known_args(argv)
    args.recipe = args.recipe or shipped_recipe().name
    if args.wipe_layer is None:
        args.wipe_layer = TWIG_WIPE[args.recipe]
    if args.head_teacher_layer is None:
        args.head_teacher_layer = HEAD_TEACHER[args.recipe]
    t0 = time.perf_counter()
    if args.data_only:
        build_twig_data(args.work, args.twig_examples, TWIG_VAL_EXAMPLES, args.seed, args.workers)
        build_head_data(args.work, args.head_examples, args.seed, args.workers)
        print(f"the twig's and the head's data in {args.work} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return
    if (ASSETS / VISION_WEIGHTS).is_file():
        built = recipe_from_metadata(read_metadata(ASSETS / VISION_WEIGHTS)).name
        if built != args.recipe:
            raise TwigVLMError(
                f"{ASSETS} holds a {built} base, not {args.recipe}: pass --recipe {built}, or build into another "
                f"folder ({ASSETS_ENV}=DIR)"
            )
    else:
        train_vision.main(
            [
                "--work",
                str(args.work / "vision"),
                "--seed",
                str(args.seed),
                "--device",
                args.device,
                "--workers",
                str(args.workers),
                "--recipe",
                args.recipe,
                "--precision",
                args.precision,
                *vision_argv,
            ]
        )
        if not (ASSETS / VISION_WEIGHTS).is_file():  # the budget ran out before alignment wrote the weights
            raise TwigVLMError(f"the vision stages stopped before writing {ASSETS / VISION_WEIGHTS}: re-run to go on")
        print(f"vision stage done at {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    if not (TWIG_DIR / CONFIG_NAME).is_file():
        data, val = build_twig_data(args.work, args.twig_examples, TWIG_VAL_EXAMPLES, args.seed, args.workers)
        out = args.work / "twig"
        cfg = TrainConfig(
            model="demo",
            data=str(data),
            eval_data=str(val),
            out=str(out),
            K=2,
            T=3,
            head="shared",
            layer_init=args.layer_init,
            wipe_layer=args.wipe_layer,
            epochs=args.twig_epochs,
            batch_size=args.twig_batch,
            lr=args.twig_lr,
            distill=args.distill,
            save_steps=200 if resolve_device(args.device) == "cuda" else 50,  # CPU: a stopped session loses less
            # an evaluation runs its 120 examples through every layer (v2 on a 2-core CPU: ~4 min), so not at each
            # CPU checkpoint: every 250 steps there (and at the end, as always)
            eval_steps=None if resolve_device(args.device) == "cuda" else 250,
            logging_steps=20,
            save_dtype="bfloat16",
            device=args.device,
            precision=args.precision,
            num_workers=args.workers,
            draft_vocab=args.draft_vocab,
            resume=clear_unfinished(out),  # (a checkpoint half-written by a stopped session is removed first)
            seed=args.seed,
        )
        result = train_twig(cfg)
        _ship_twig(result.out)
        print(
            f"twig stage done at {(time.perf_counter() - t0) / 60:.1f} min: agreement with the base "
            f"{result.eval_after.get('eval_agreement', float('nan')):.3f}",
            flush=True,
        )
    if not read_twig_config(TWIG_DIR).get("prune_head"):
        data, val = build_head_data(args.work, args.head_examples, args.seed, args.workers)
        out = args.work / "twig-head"
        cfg = TrainConfig(
            model="demo",
            init=str(TWIG_DIR),
            objective="pruning",
            teacher_layer=args.head_teacher_layer,
            data=str(data),
            eval_data=str(val),
            out=str(out),
            epochs=2,
            batch_size=8,
            lr=1e-3,
            save_dtype="bfloat16",
            device=args.device,
            precision=args.precision,
            seed=args.seed,
        )
        head = train_prune_head(cfg)
        _ship_twig(head.out)
        print(
            f"pruning-head stage done at {(time.perf_counter() - t0) / 60:.1f} min: the teacher's top M/9 held "
            f"{head.overlap_before:.3f} → {head.overlap_after:.3f}",
            flush=True,
        )
    print(f"demo assets in {ASSETS} (built in {(time.perf_counter() - t0) / 60:.1f} min)", flush=True)


SHIPPED_FILE_BYTES = 16 * 2**20  # no shipped file larger than this


def _ship_twig(trained: Path) -> None:
    """Write a trained twig into the shipped twig folder, in files of at most 16 MiB."""
    copy_twig(trained, TWIG_DIR, SHIPPED_FILE_BYTES)


if __name__ == "__main__":
    import sys

    from ..errors import module_main

    sys.exit(module_main(main, "twigvlm.demo.build"))
