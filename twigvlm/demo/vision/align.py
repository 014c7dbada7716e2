"""Stage 2 (the long one): the assembled LLaVA, cross-entropy on the answers of the training mixture
(`twigvlm.data.examples`), gradients through the frozen decoder into the projector and the ViT — and, with a
LoRA rank, into low-rank adapters on the decoder's linear layers, which ship beside the vision weights and are
merged into the decoder at load (`twigvlm.demo.lora`). The recipe says whether the decoder's layers from K_f on run
without the picture (`wiped.answer_loss`) and in what share of the steps (`step_wipe`), and whether the LoRA adapts
only the layers below K_f (v2 does both). With `--pack`, each picture carries several of its examples
(`packed_batch`).

Stops early, checkpointed, when the run's wall-clock budget is spent (`loop.out_of_time`); a re-run continues."""

from __future__ import annotations

import argparse
import itertools
import random
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ...adapters.capabilities import concat_vision
from ...data.examples import Example, group_stream, training_stream
from ..lora import DecoderLoRA
from ..model import vision_prefixes
from ..recipe import VisionRecipe
from .evaluation import evaluate, format_scores
from .loop import (
    apply_gradients,
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
from .wiped import answer_loss, row_parts, scored_tokens

# A budgeted run times steps FIT_FROM..FIT_AFTER after its start (the first ones warm caches and kernels up) and then
# fits its schedule's horizon to the time left (`loop.fit_horizon`).
FIT_FROM, FIT_AFTER = 5, 30


def _tokenized(adapter: Any, ex: Example, image: Any) -> tuple[list[int], list[bool], Any]:
    """One (image, question, answer) conversation: ids, the answer mask and pixel values."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]},
        {"role": "assistant", "content": ex.answer},
    ]
    return adapter.tokenize_chat(messages, [image])


def _labels(ids: list[int], is_answer: list[bool]) -> list[int]:
    from ...train.data import IGNORE_INDEX

    return [t if a else IGNORE_INDEX for t, a in zip(ids, is_answer, strict=True)]


def _batch(adapter: Any, examples: list[Example]) -> dict[str, torch.Tensor]:
    """A padded batch of (image, question, answer) conversations, labels on the answer tokens only."""
    from ...train.data import Collator, pad_token_id

    items = []
    for ex in examples:
        ids, is_answer, pixels = _tokenized(adapter, ex, ex.image())
        items.append(
            {"input_ids": torch.tensor(ids), "pixel_values": pixels, "labels": torch.tensor(_labels(ids, is_answer))}
        )
    return Collator(pad_token_id(adapter))(items)


def packed_batch(adapter: Any, groups: list[list[Example]]) -> dict[str, torch.Tensor]:
    """A right-padded batch with one picture a row and all of that picture's examples packed behind it.

    A row is the conversation's shared start (through the last image token) once, then each example's own tokens
    (question, assistant header, answer). `segment` [B, T] says whose token each is (0: the shared start, s ≥ 1:
    example s, −1: padding) and `position_ids` [B, T] put each example's tokens where they would be alone, so
    with `wiped.answer_loss`'s mask (a token sees the shared start and its own example's earlier tokens) every
    example's loss is exactly its loss alone, while the picture runs through the decoder once for all of them."""
    from ...train.data import IGNORE_INDEX, pad_token_id

    rows, pixels = [], []
    for group in groups:
        image = group[0].image()
        tokenized = [_tokenized(adapter, ex, image) for ex in group]
        first = tokenized[0][0]
        start = max(i for i, t in enumerate(first) if t == adapter.image_token_id) + 1
        ids, labels, segment, pos = first[:start], [IGNORE_INDEX] * start, [0] * start, list(range(start))
        for s, (own, is_answer, _) in enumerate(tokenized, 1):
            if own[:start] != first[:start]:
                raise ValueError("the packed examples of a picture must share the conversation's start")
            ids += own[start:]
            labels += _labels(own, is_answer)[start:]
            segment += [s] * (len(own) - start)
            pos += range(start, len(own))
        rows.append((ids, labels, segment, pos))
        pixels.append(tokenized[0][2])
    n = max(len(r[0]) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), n), pad_token_id(adapter), dtype=torch.long),  # [B, T]
        "labels": torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long),
        "segment": torch.full((len(rows), n), -1, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), n), dtype=torch.long),
    }
    for b, row in enumerate(rows):
        for key, values in zip(("input_ids", "labels", "segment", "position_ids"), row, strict=True):
            out[key][b, : len(values)] = torch.tensor(values)
    return {**out, "pixel_values": concat_vision(pixels)}


def step_batch(adapter: Any, seed: int, step: int, batch: int, pack: int = 1) -> dict[str, torch.Tensor]:
    """Alignment step `step`'s batch (a pure function of the step, so a resumed run sees the same data): the next
    `batch` examples of the training mixture, or with `pack` > 1 the next `batch` pictures of the packed mixture,
    each with up to `pack` of its examples (`packed_batch`)."""
    if pack > 1:
        return packed_batch(adapter, list(itertools.islice(group_stream(seed, step * batch, pack), batch)))
    return _batch(adapter, list(itertools.islice(training_stream(seed, step * batch), batch)))


def step_wipe(recipe: VisionRecipe, seed: int, step: int) -> int | None:
    """The layer from which step `step` runs without the picture: the recipe's K_f in a `wipe_share` of the steps
    (drawn per step, so a resumed run draws the same), None (every layer reads it) in the others."""
    if recipe.wipe_layer is None or random.Random(seed * 7_919 + step).random() >= recipe.wipe_share:
        return None
    return recipe.wipe_layer


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
    params = [p for g in groups for p in g["params"]]
    sched = schedule(opt, args.align_steps, 100)
    ckpt = args.work / "align.pt"
    start = resume_vision(ckpt, model, opt, sched, lora) or getattr(args, "init_step", 0)
    if start and not ckpt.is_file():  # --init: the shipped weights of an unfinished run, its schedule's step
        for _ in range(start):
            sched.step()

    def make(step: int) -> dict:
        return step_batch(vlm.adapter, args.seed, step, args.align_batch, args.pack)

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
        wipe = step_wipe(recipe, args.seed, step)
        if args.align_micro == 1:
            with autocast(args):
                loss = answer_loss(vlm.adapter, batch, wipe, args.token_dropout, recipe.dropout_layer, dropout)
            optimize(loss, opt, sched, params, bar)
        else:  # the same step in less memory: its rows in parts, their gradients summed
            opt.zero_grad()
            answers, value = scored_tokens(batch), 0.0  # (`total` is the schedule's horizon)
            for part in row_parts(batch, args.align_micro):
                with autocast(args):
                    loss = answer_loss(
                        vlm.adapter, part, wipe, args.token_dropout, recipe.dropout_layer, dropout, total=answers
                    )
                loss.backward()
                value += loss.item()
            apply_gradients(opt, sched, params, bar, value)
        model.eval()
        done = step + 1
        if due(done, args.save_every, total):
            save_vision(ckpt, model, opt, sched, done, lora)
        if args.eval_every and due(done, args.eval_every, total):
            with autocast(args):
                scores = evaluate(model, processor, args.eval_n, args.eval_describe)
            bar.write(f"step {done}: val " + format_scores(scores))
    return lora, done, total
