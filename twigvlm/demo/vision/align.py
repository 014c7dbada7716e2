"""Stage 2 (the long one): the assembled LLaVA, cross-entropy on the answers of the training mixture
(`twigvlm.data.examples`), gradients through the frozen decoder into the projector and the ViT — and, with a
LoRA rank, into low-rank adapters on the decoder's linear layers, which ship beside the vision weights and are
merged into the decoder at load (`twigvlm.demo.lora`). The recipe says whether the decoder's layers from K_f on run
without the picture (`wiped.answer_loss`) and whether the LoRA adapts only the layers below K_f (v2 does both).

Stops early, checkpointed, when the run's wall-clock budget is spent (`loop.out_of_time`); a re-run continues."""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ...data.examples import Example, training_stream
from ..lora import DecoderLoRA
from ..model import vision_prefixes
from .evaluation import evaluate, format_scores
from .loop import (
    autocast,
    batches,
    due,
    fit_horizon,
    optimize,
    out_of_time,
    resume_vision,
    save_vision,
    schedule,
    to_device,
)
from .wiped import answer_loss

# A budgeted run times steps FIT_FROM..FIT_AFTER after its start (the first ones warm caches and kernels up) and then
# fits its schedule's horizon to the time left (`loop.fit_horizon`).
FIT_FROM, FIT_AFTER = 5, 30


def _batch(adapter: Any, examples: list[Example]) -> dict[str, torch.Tensor]:
    """A padded batch of (image, question, answer) conversations, labels on the answer tokens only."""
    from ...train.data import IGNORE_INDEX, Collator, pad_token_id

    items = []
    for ex in examples:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]},
            {"role": "assistant", "content": ex.answer},
        ]
        ids, is_answer, pixels = adapter.tokenize_chat(messages, [ex.image()])
        items.append(
            {
                "input_ids": torch.tensor(ids),
                "pixel_values": pixels,
                "labels": torch.tensor([t if a else IGNORE_INDEX for t, a in zip(ids, is_answer, strict=True)]),
            }
        )
    return Collator(pad_token_id(adapter))(items)


def step_batch(adapter: Any, seed: int, step: int, batch: int) -> dict[str, torch.Tensor]:
    """Alignment step `step`'s batch: the next `batch` examples of the training mixture (a pure function of the
    step, so a resumed run sees the same data)."""
    return _batch(adapter, list(itertools.islice(training_stream(seed, step * batch), batch)))


def align(model: Any, processor: Any, args: argparse.Namespace) -> tuple[DecoderLoRA | None, int, int]:
    """Stage 2: projector + ViT (+ decoder LoRA) through the decoder, on the answers of the training mixture
    (checkpoint: WORK/align.pt); validates every --eval-every steps. Returns the LoRA (if one was trained), the
    steps done and the schedule's horizon: with a budget, the steps that fit it (≤ --align-steps); done < horizon
    when the budget ran out anyway."""
    from ...api import VLM

    vlm = VLM.from_model(model, processor)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(vision_prefixes()))
    groups = [
        {"params": list(model.model.multi_modal_projector.parameters()), "lr": args.align_lr},
        {"params": list(model.model.vision_tower.parameters()), "lr": args.align_lr * args.tower_lr_scale},
    ]
    recipe, lora = args.recipe, None
    if args.lora_rank:
        below = recipe.wipe_layer if recipe.lora_below_wipe else None
        lora = DecoderLoRA(model, args.lora_rank, below=below).attach(model)
        if getattr(args, "init_lora", None):
            lora.load_shipped(args.init_lora)
        groups.append({"params": list(lora.parameters()), "lr": args.lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = schedule(opt, args.align_steps, 100)
    ckpt = args.work / "align.pt"
    start = resume_vision(ckpt, model, opt, sched, lora) or getattr(args, "init_step", 0)
    if start and not ckpt.is_file():  # --init: the shipped weights of an unfinished run, its schedule's step
        for _ in range(start):
            sched.step()

    def make(step: int) -> dict:
        return step_batch(vlm.adapter, args.seed, step, args.align_batch)

    bar = tqdm(range(start, args.align_steps), initial=start, total=args.align_steps, desc="align")
    done, total, clock = start, sched.lr_lambdas[0].total, None
    for step, batch in zip(bar, batches(make, start, args.align_steps, args), strict=False):
        if done >= total:
            break
        if done == start + FIT_FROM:
            clock = time.monotonic()
        if clock is not None and done == start + FIT_AFTER and args.deadline is not None:
            per_step = (time.monotonic() - clock) / (FIT_AFTER - FIT_FROM)
            total = fit_horizon(sched, done, per_step, args)
            bar.total = total
            bar.write(f"align: {per_step:.3f} s a step; {total} steps fit the budget (planned {args.align_steps})")
        if out_of_time(args):
            save_vision(ckpt, model, opt, sched, done, lora)
            bar.write(f"align: the budget ran out at step {done} of {args.align_steps} (checkpointed; re-run to go on)")
            break
        batch = to_device(batch, args.device)
        model.train()
        dropout = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        with autocast(args):
            loss = answer_loss(
                vlm.adapter, batch, recipe.wipe_layer, args.token_dropout, recipe.dropout_layer, generator=dropout
            )
        optimize(loss, opt, sched, [p for g in groups for p in g["params"]], bar)
        model.eval()
        done = step + 1
        if due(done, args.save_every, total):
            save_vision(ckpt, model, opt, sched, done, lora)
        if args.eval_every and due(done, args.eval_every, total):
            with autocast(args):
                scores = evaluate(model, processor, args.eval_n, args.eval_describe)
            bar.write(f"step {done}: val " + format_scores(scores))
    return lora, done, total
