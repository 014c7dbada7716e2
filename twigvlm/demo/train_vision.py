"""Train the demo's vision tower and projector with the SmolLM2 decoder frozen: `python -m twigvlm.demo.train_vision`.

The stages live in `twigvlm.demo.vision`, one module each: `pretrain` (stage 1, the ViT alone on what is
where), `ground` (stage 1b, visual tokens onto word embeddings) and `align` (stage 2, answers through the
frozen decoder, with a decoder LoRA of rank --lora-rank). This command runs them in order and writes the
result to the package's `demo/assets/` in half precision.

Every stage checkpoints to --work every --save-every steps (weights, optimizer, schedule, step) and a re-run
continues exactly (each step's batch is a pure function of the step, built by --workers data processes); a
finished stage is skipped. Prints how long it took. `--device cuda` trains on a GPU (bf16 autocast); the
defaults are the shipped recipe.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .lora import DecoderLoRA
from .model import ASSETS, LORA_WEIGHTS, VISION_WEIGHTS, build_demo, vision_state
from .vision.align import align
from .vision.ground import ground
from .vision.loop import default_workers
from .vision.pretrain import pretrain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train the demo VLM's vision tower and projector (and decoder LoRA).")
    ap.add_argument("--work", type=Path, default=Path("runs/demo-vision"), help="checkpoints (resumable)")
    ap.add_argument("--out", type=Path, default=ASSETS, help="folder for the half-precision weights")
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--pretrain-batch", type=int, default=32)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--ground-steps", type=int, default=800)
    ap.add_argument("--ground-lr", type=float, default=1e-3)
    ap.add_argument("--align-steps", type=int, default=3000)
    ap.add_argument("--align-batch", type=int, default=32)
    ap.add_argument("--align-lr", type=float, default=1e-3)
    ap.add_argument("--tower-lr-scale", type=float, default=0.3, help="the ViT's lr relative to the projector's")
    ap.add_argument("--lora-rank", type=int, default=16, help="decoder LoRA rank (0: decoder frozen)")
    ap.add_argument("--lora-lr", type=float, default=5e-4)
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
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    args.device = torch.device(device)
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and device == "cuda")
    return args


def write_assets(model: torch.nn.Module, lora: DecoderLoRA | None, out: Path) -> None:
    """The shipped files: the vision weights, and the LoRA (or no LoRA file when none was trained)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(vision_state(model), str(out / VISION_WEIGHTS), metadata={"format": "pt"})
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
    model, processor = build_demo(seed=args.seed, use_assets=False)  # random vision weights; checkpoints restore
    model.to(args.device)
    if not (args.work / "align.pt").is_file():
        if not (args.work / "ground.pt").is_file():
            pretrain(model, processor, args)
        ground(model, processor, args)
    lora = align(model, processor, args)
    write_assets(model, lora, args.out)
    print(f"wrote {args.out / VISION_WEIGHTS} in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
