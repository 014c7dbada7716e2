"""Stage 2 (the long one): the assembled LLaVA, cross-entropy on the answers of the training mixture
(`twigvlm.data.examples`), gradients through the frozen decoder into the projector and the ViT — and, with a
LoRA rank, into low-rank adapters on the decoder's linear layers, which ship beside the vision weights and are
merged into the decoder at load (`twigvlm.demo.lora`)."""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch
from tqdm.auto import tqdm

from ...data.examples import Example, training_stream
from ..lora import DecoderLoRA
from ..model import vision_prefixes
from .evaluation import evaluate, format_scores
from .loop import autocast, batches, due, optimize, resume_vision, save_vision, schedule, to_device


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


def align(model: Any, processor: Any, args: argparse.Namespace) -> DecoderLoRA | None:
    """Stage 2: projector + ViT (+ decoder LoRA) through the decoder, on the answers of the training mixture
    (checkpoint: WORK/align.pt); validates every --eval-every steps. Returns the LoRA, if one was trained."""
    from ...api import VLM

    vlm = VLM.from_model(model, processor)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(vision_prefixes()))
    groups = [
        {"params": list(model.model.multi_modal_projector.parameters()), "lr": args.align_lr},
        {"params": list(model.model.vision_tower.parameters()), "lr": args.align_lr * args.tower_lr_scale},
    ]
    lora = None
    if args.lora_rank:
        lora = DecoderLoRA(model, args.lora_rank).attach(model)
        groups.append({"params": list(lora.parameters()), "lr": args.lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = schedule(opt, args.align_steps, 100)
    ckpt = args.work / "align.pt"
    start = resume_vision(ckpt, model, opt, sched, lora)

    def make(step: int) -> dict:
        examples = itertools.islice(training_stream(args.seed, step * args.align_batch), args.align_batch)
        return _batch(vlm.adapter, list(examples))

    bar = tqdm(range(start, args.align_steps), initial=start, total=args.align_steps, desc="align")
    for step, batch in zip(bar, batches(make, start, args.align_steps, args), strict=False):
        batch = to_device(batch, args.device)
        model.train()
        with autocast(args):
            loss = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        optimize(loss, opt, sched, [p for g in groups for p in g["params"]], bar)
        model.eval()
        done = step + 1
        if due(done, args.save_every, args.align_steps):
            save_vision(ckpt, model, opt, sched, done, lora)
        if args.eval_every and due(done, args.eval_every, args.align_steps):
            with autocast(args):
                scores = evaluate(model, processor, args.eval_n, args.eval_describe)
            bar.write(f"step {done}: val " + format_scores(scores))
    return lora
