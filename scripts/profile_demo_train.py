"""Profile the demo base's vision training before spending GPU time on it: per stage, the seconds a batch takes to
build (one data process), the arithmetic of one training step (torch's FLOP counter), the seconds and peak memory
of a few real steps at the real batch size on this machine, and what that projects for a GPU call.

    python scripts/profile_demo_train.py --recipe v2 --steps 2 --out runs/profile-v2.json          # on the CPU
    python scripts/profile_demo_train.py --recipe v2 --device cuda --steps 20 --out $OUT/profile.json

The projection divides each step's FLOPs by an H200's dense bf16 rate (790 TFLOP/s) at a few utilisations (a
135M decoder with hidden size 576 keeps a GPU far from its peak: the measured `--device cuda` figure replaces the
guess), and counts the data processes needed to build batches as fast as the GPU takes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from twigvlm.api import VLM
from twigvlm.data import easyvqa
from twigvlm.demo.lora import DecoderLoRA
from twigvlm.demo.model import build_demo, vision_prefixes
from twigvlm.demo.recipe import recipe
from twigvlm.demo.train_vision import DEFAULTS
from twigvlm.demo.vision import align as align_stage
from twigvlm.demo.vision import pretrain as pretrain_stage
from twigvlm.demo.vision.loop import to_device
from twigvlm.demo.vision.wiped import answer_loss
from twigvlm.runtime.machine import speed_flags

H200_BF16 = 790e12  # dense bf16 FLOP/s measured on the lent H200 (8192³ products)
UTILISATIONS = (0.1, 0.2, 0.4)


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def _train_step(loss_fn, opt: torch.optim.Optimizer, auto) -> None:
    with auto:
        loss = loss_fn()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB (the process's peak)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="v2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per stage (after one untimed)")
    ap.add_argument("--align-batch", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--pretrain-batch", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--pack", type=int, default=None, help="alignment examples a picture (default: the recipe's)")
    ap.add_argument("--align-only", action="store_true", help="skip stage 1")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on a GPU")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    r = recipe(args.recipe)
    plan = DEFAULTS[r.name]
    align_batch = args.align_batch or plan["align_batch"]
    pretrain_batch = args.pretrain_batch or plan["pretrain_batch"]
    pack = args.pack or plan["pack"]
    device = torch.device(args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    report: dict = {
        "recipe": r.name,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_flags": speed_flags(),
        "threads": torch.get_num_threads(),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "visual_tokens": r.num_visual,
    }
    print(json.dumps(report), flush=True)
    model, processor = build_demo(use_assets=False, recipe=r)
    model.to(device)
    vlm = VLM.from_model(model, processor)
    auto = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    if not args.align_only:
        _profile_pretrain(args, r, plan, pretrain_batch, model, processor, device, auto, report)
    _profile_align(args, r, plan, align_batch, pack, model, vlm, device, auto, report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


def _profile_pretrain(args, r, plan, pretrain_batch, model, processor, device, auto, report) -> None:
    """Stage 1: the tower alone."""
    labels = easyvqa.image_labels(easyvqa.load("train"))
    build = _timed(lambda: pretrain_stage._batch(0, pretrain_batch, processor, labels), 2)
    tower = model.model.vision_tower
    heads = pretrain_stage.AuxHeads(tower.config.hidden_size, context=r.context_weight > 0).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = to_device(pretrain_stage._batch(0, pretrain_batch, processor, labels), device)

    def pretrain_step() -> None:
        _train_step(lambda: pretrain_stage._loss(tower, heads, batch, r.context_weight), opt, auto)

    with FlopCounterMode(display=False) as flops:
        pretrain_step()
    times = _timed(pretrain_step, args.steps)
    report["pretrain"] = _stage(pretrain_batch, build, flops.get_total_flops(), times, plan["pretrain_steps"], device)
    print(json.dumps({"pretrain": report["pretrain"]}), flush=True)


def _profile_align(args, r, plan, align_batch, pack, model, vlm, device, auto, report) -> None:
    """Stage 2: answers through the decoder, the picture wiped from K_f on (`pack` examples behind each picture)."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(vision_prefixes()))
    lora = DecoderLoRA(model, args.lora_rank, below=r.wipe_layer if r.lora_below_wipe else None).attach(model)
    params = [p for n, p in model.named_parameters() if n.startswith(vision_prefixes())] + list(lora.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)

    build = _timed(lambda: align_stage.step_batch(vlm.adapter, 0, 1, align_batch, pack), 2)
    batch = to_device(align_stage.step_batch(vlm.adapter, 0, 0, align_batch, pack), device)
    report["align_tokens_per_row"] = int(batch["input_ids"].shape[1])
    report["align_pack"] = pack
    report["align_examples_per_step"] = int(batch["segment"].max(1).values.sum()) if pack > 1 else align_batch

    def align_step() -> None:
        _train_step(lambda: answer_loss(vlm.adapter, batch, r.wipe_layer, r.token_dropout, r.dropout_layer), opt, auto)

    model.train()
    with FlopCounterMode(display=False) as flops:
        align_step()
    times = _timed(align_step, args.steps)
    report["align"] = _stage(align_batch, build, flops.get_total_flops(), times, plan["align_steps"], device)
    report["align"]["s_per_example_here"] = round(report["align"]["step_s_here"] / report["align_examples_per_step"], 3)
    print(json.dumps({"align": report["align"]}), flush=True)


def _stage(batch: int, build: list[float], flops: int, times: list[float], planned: int, device) -> dict:
    """One stage's figures and projections."""
    step = statistics.median(times)
    gpu = {f"{u:.0%}": flops / (H200_BF16 * u) for u in UTILISATIONS}
    return {
        "batch": batch,
        "build_s_per_batch_one_process": round(statistics.median(build), 3),
        "tflop_per_step": round(flops / 1e12, 3),
        "step_s_here": round(step, 3),
        "tflop_s_here": round(flops / step / 1e12, 3),
        "peak_gib_here": round(_peak_gib(device), 2),
        "planned_steps": planned,
        "planned_min_here": round(planned * step / 60, 1),
        "h200_step_s_at_utilisation": {k: round(v, 4) for k, v in gpu.items()},
        "h200_planned_min_at_utilisation": {k: round(planned * v / 60, 2) for k, v in gpu.items()},
        "data_processes_to_keep_up_at_20%": round(statistics.median(build) / gpu["20%"], 1),
    }


if __name__ == "__main__":
    main()
