"""Stage 1 (minutes on a CPU): the ViT alone, with small linear heads on pooled patch features — per grid cell
the colour, shape and size of the scene object there (or none), and for easy-VQA pictures the shape and colour
— so that its features already say what is where before the decoder ever sees them.

With a recipe's `context_weight` (v2), the picture-level targets are also asked of every token alone and of the
pooled tokens: the objects (colour and shape pairs), colours, shapes, sizes and occupied places of a scene, how
many objects it has (at least 1 … at least 6), and an easy-VQA picture's shape and colour. A token must then carry
context beyond its own patch, as the tokens of a CLIP/SigLIP tower trained on whole-picture objectives do — the
redundancy that lets a VLM answer from a few of them."""

from __future__ import annotations

import argparse
import math
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...data import easyvqa
from ...data.examples import IMAGE_SIZE, easyvqa_items, easyvqa_pool
from ...data.scenes import COLORS, POSITIONS, SHAPES, SIZES, make_scene, scene_seed
from .evaluation import format_scores
from .ground import patch_cover
from .loop import autocast, batches, checkpoint, due, optimize, out_of_time, schedule, to_device

MAX_OBJECTS = 6
PAIRS = [(c, s) for c in sorted(COLORS) for s in SHAPES]
# A scene's picture-level bits: objects, colours, shapes, sizes, occupied places, "at least k objects".
BAG = len(PAIRS) + len(COLORS) + len(SHAPES) + len(SIZES) + len(POSITIONS) + MAX_OBJECTS
# The cell head's logits [17]: colour (8 + none), shape (4 + none), size (2 + none), as slices.
_C, _S = len(COLORS) + 1, len(SHAPES) + 1
CELL_SPLITS = (slice(0, _C), slice(_C, _C + _S), slice(_C + _S, _C + _S + len(SIZES) + 1))
PROBE_SCENES = 128  # val scenes stage 1's closing probe reads
BAG_SCALE = 16  # the bag's mean-over-bits BCE × about the bits a scene sets: a loss on the cells' CE's scale


class AuxHeads(nn.Module):
    """Linear read-outs used only in stage 1: per cell (colour, shape, size incl. "none"); per picture (easy-VQA's
    shape and colour; a scene's bag of picture-level bits)."""

    def __init__(self, width: int, context: bool = False) -> None:
        super().__init__()
        self.cell = nn.Linear(width, (len(COLORS) + 1) + (len(SHAPES) + 1) + (len(SIZES) + 1))
        self.whole = nn.Linear(width, len(easyvqa.SHAPES) + len(easyvqa.COLORS))
        self.bag = nn.Linear(width, BAG) if context else None  # the recipe's context targets (v2)

    def cells(self, feats: torch.Tensor) -> torch.Tensor:
        """Per 3×3 cell: [B, N, W] → [B, 9, 17] logits from the cell's mean token."""
        return self.cell(cell_pool(feats))


def cell_pool(feats: torch.Tensor) -> torch.Tensor:
    """Each 3×3 cell's mean token: [B, N, W] → [B, 9, W]."""
    b, n, w = feats.shape
    g = math.isqrt(n)  # patches a side; a cell is g/3 of them
    return feats.view(b, 3, g // 3, 3, g // 3, w).mean(dim=(2, 4)).reshape(b, 9, w)


def cell_targets(objects: list) -> torch.Tensor:
    """[9, 3] class ids per cell: colour, shape, size (0 = empty)."""
    t = torch.zeros(9, 3, dtype=torch.long)
    for o in objects:
        t[o.cell] = torch.tensor(
            [sorted(COLORS).index(o.color) + 1, SHAPES.index(o.shape) + 1, SIZES.index(o.size) + 1]
        )
    return t


def scene_bag(objects: list) -> torch.Tensor:
    """A scene's picture-level bits [BAG] (0/1): which objects (colour and shape), colours, shapes, sizes and places
    it has, and whether it has at least 1, 2, … MAX_OBJECTS objects."""
    bits = torch.zeros(BAG)
    colors, offsets = sorted(COLORS), [0]
    for n in (len(PAIRS), len(COLORS), len(SHAPES), len(SIZES), len(POSITIONS)):
        offsets.append(offsets[-1] + n)
    for o in objects:
        bits[offsets[0] + PAIRS.index((o.color, o.shape))] = 1
        bits[offsets[1] + colors.index(o.color)] = 1
        bits[offsets[2] + SHAPES.index(o.shape)] = 1
        bits[offsets[3] + SIZES.index(o.size)] = 1
        bits[offsets[4] + o.cell] = 1
    bits[offsets[5] : offsets[5] + min(len(objects), MAX_OBJECTS)] = 1
    return bits


def patch_targets(scene: Any, grid: int) -> torch.Tensor:
    """[grid², 3] class ids per patch: the colour, shape and size of the object covering more than 0.3 of it
    (0 = none, as the cells' ids)."""
    t = torch.zeros(grid * grid, 3, dtype=torch.long)
    for o, mask in zip(scene.objects, scene.object_masks(IMAGE_SIZE), strict=True):
        t[patch_cover(mask, grid) > 0.3] = cell_targets([o])[o.cell]
    return t


def _batch(step: int, batch: int, processor: Any, labels: dict, grid: int = 0) -> dict[str, torch.Tensor]:
    """Step `step`'s pictures: half scenes (per-cell targets; per-patch ones too where `grid` names the tower's
    patches a side), half easy-VQA (shape and colour, -100 if unknown)."""
    rng = random.Random(10_007 * step + 3)
    half = batch // 2
    scene_ids = [rng.randrange(10**7) for _ in range(half)]
    pool = easyvqa_pool("train")
    evqa = [easyvqa_items("train")[pool[rng.randrange(len(pool))]] for _ in range(batch - half)]
    scenes = [make_scene(scene_seed("train", i)) for i in scene_ids]
    images = [sc.render(IMAGE_SIZE) for sc in scenes] + [e.image_rgb() for e in evqa]
    whole = torch.full((batch - half, 2), -100, dtype=torch.long)
    for k, e in enumerate(evqa):
        shape, color = labels.get(e.q.image_id, (None, None))
        if shape:
            whole[k, 0] = easyvqa.SHAPES.index(shape)
        if color:
            whole[k, 1] = easyvqa.COLORS.index(color)
    out = {
        "pixel_values": processor.image_processor(images, return_tensors="pt")["pixel_values"],
        "cells": torch.stack([cell_targets(list(sc.objects)) for sc in scenes]),
        "bag": torch.stack([scene_bag(list(sc.objects)) for sc in scenes]),
        "whole": whole,
        "half": half,
    }
    if grid:
        out["patches"] = torch.stack([patch_targets(sc, grid) for sc in scenes])  # [half, grid², 3]
    return out


def _whole_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """easy-VQA shape and colour CE; logits [n, 9] or [n, N, 9] (every token), target [n, 2] (-100: unknown)."""
    if logits.dim() == 3:
        target = target[:, None].expand(-1, logits.shape[1], -1)  # [n, N, 2]
        logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1, 2)
    k = len(easyvqa.SHAPES)
    return F.cross_entropy(logits[:, :k], target[:, 0], ignore_index=-100) + F.cross_entropy(
        logits[:, k:], target[:, 1], ignore_index=-100
    )


def _classes_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cell head's three cross-entropies (colour, shape, size): logits [..., 17], targets [..., 3]."""
    return sum(
        F.cross_entropy(logits[..., part].reshape(-1, part.stop - part.start), targets[..., k].reshape(-1))
        for k, part in enumerate(CELL_SPLITS)
    )


def _loss(
    tower: nn.Module, heads: AuxHeads, b: dict, context_weight: float = 0.0, patch_weight: float = 0.0
) -> torch.Tensor:
    """Stage 1's loss on a batch whose first b["half"] pictures are scenes; context_weight > 0 adds the
    picture-level targets asked of every token and of the pooled tokens, patch_weight > 0 the classes of the
    object on each token's own patch (b["patches"]), read by the cell head from the token alone."""
    feats = tower(pixel_values=b["pixel_values"], output_hidden_states=True).hidden_states[-1]  # [B, N, W]
    h = b["half"]
    loss = _classes_loss(heads.cells(feats[:h]), b["cells"])  # [h, 9, 17] against [h, 9, 3]
    if patch_weight:
        loss = loss + patch_weight * _classes_loss(heads.cell(feats[:h]), b["patches"])  # [h, N, 17], [h, N, 3]
    easy = feats.shape[0] > h  # easy-VQA rows follow the scenes
    if easy:
        loss = loss + _whole_loss(heads.whole(feats[h:].mean(1)), b["whole"])
    if context_weight:
        bag = b["bag"]  # [h, BAG]
        pooled = F.binary_cross_entropy_with_logits(heads.bag(feats[:h].mean(1)), bag)
        tokens = heads.bag(feats[:h])  # [h, N, BAG]: every token alone
        each = F.binary_cross_entropy_with_logits(tokens, bag[:, None].expand_as(tokens))
        context = BAG_SCALE * (pooled + each)
        if easy:
            context = context + _whole_loss(heads.whole(feats[h:]), b["whole"])
        loss = loss + context_weight * context
    return loss


def cell_tally(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Right answers and totals of the cell head: logits [B, 9, 17], targets [B, 9, 3] (class ids, 0 = empty) →
    [4, 2] (right, total) for colour, shape and size over the occupied cells, and "empty" over the empty ones."""
    pred = torch.stack([logits[..., part].argmax(-1) for part in CELL_SPLITS], -1)  # [B, 9, 3]
    full = targets[..., 0] > 0  # [B, 9]
    right = pred == targets
    rows = [(right[..., k][full].sum(), full.sum()) for k in range(3)]
    rows.append((right[..., 0][~full].sum(), (~full).sum()))
    return torch.tensor([[int(r), int(t)] for r, t in rows])


def bag_tally(logits: torch.Tensor, bag: torch.Tensor) -> torch.Tensor:
    """(true positives, predicted, actual) of picture-level bits: logits [..., BAG] > 0 against bag [..., BAG]."""
    pred = logits > 0
    return torch.tensor([int((pred & (bag > 0)).sum()), int(pred.sum()), int((bag > 0).sum())])


def _f1(t: torch.Tensor) -> float:
    tp, predicted, actual = t.tolist()
    return 2 * tp / max(1, predicted + actual)


@torch.no_grad()
def probe(
    tower: nn.Module, heads: AuxHeads, processor: Any, n: int = 128, split: str = "val", batch: int = 32
) -> dict[str, float]:
    """What stage 1's read-outs get right on the first n scenes of `split` (none of them trained on): the colour,
    shape and size of each occupied cell, "empty" for the others, and with the context head the F1 of the picture's
    bits read from each token alone and from the pooled tokens. Shapes the decoder cannot tell apart later are
    visible here first, minutes into the run instead of hours."""
    cells, token = torch.zeros(4, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    pooled = torch.zeros(3, dtype=torch.long) if heads.bag is not None else None
    device = next(tower.parameters()).device
    for start in range(0, n, batch):
        scenes = [make_scene(scene_seed(split, i)) for i in range(start, min(n, start + batch))]
        pixels = processor.image_processor([sc.render(IMAGE_SIZE) for sc in scenes], return_tensors="pt")
        feats = tower(pixel_values=pixels["pixel_values"].to(device), output_hidden_states=True).hidden_states[-1]
        feats = feats.float()  # [b, N, W]
        cells += cell_tally(heads.cells(feats).cpu(), torch.stack([cell_targets(list(sc.objects)) for sc in scenes]))
        if pooled is not None:
            bag = torch.stack([scene_bag(list(sc.objects)) for sc in scenes])  # [b, BAG]
            pooled += bag_tally(heads.bag(feats.mean(1)).cpu(), bag)
            token += bag_tally(heads.bag(feats).cpu(), bag[:, None].expand(-1, feats.shape[1], -1))
    out = {
        name: r / max(1, t) for name, (r, t) in zip(("colour", "shape", "size", "empty"), cells.tolist(), strict=True)
    }
    if pooled is not None:
        out |= {"bag F1 pooled": _f1(pooled), "bag F1 a token": _f1(token)}
    return out


def pretrain(model: Any, processor: Any, args: argparse.Namespace) -> dict[str, float] | None:
    """Stage 1: the ViT and aux heads on per-cell / per-picture labels (checkpoint: WORK/pretrain.pt). When it
    finished, its read-outs' `probe` on PROBE_SCENES val scenes (also printed); None when the run's budget ran out
    first (checkpointed)."""
    tower = model.model.vision_tower
    heads = AuxHeads(tower.config.hidden_size, context=args.recipe.context_weight > 0).to(args.device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.pretrain_lr, weight_decay=0.0)
    sched = schedule(opt, args.pretrain_steps, 50)
    ckpt, start = args.work / "pretrain.pt", 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False, map_location="cpu")
        tower.load_state_dict(state["tower"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
    labels = easyvqa.image_labels(easyvqa.load("train"))
    tower.train()
    bar = tqdm(range(start, args.pretrain_steps), initial=start, total=args.pretrain_steps, desc="pretrain")
    r = args.recipe
    grid = r.grid if r.patch_weight else 0

    def batch_of(step: int) -> dict:
        return _batch(step, args.pretrain_batch, processor, labels, grid)

    data = batches(batch_of, start, args.pretrain_steps, args)
    done = start
    for step, batch in zip(bar, data, strict=False):
        if out_of_time(args):
            break
        with autocast(args):
            loss = _loss(tower, heads, to_device(batch, args.device), r.context_weight, r.patch_weight)
        optimize(loss, opt, sched, params, bar)
        done = step + 1
        if due(done, args.save_every, args.pretrain_steps) or out_of_time(args):
            checkpoint(
                ckpt,
                tower=tower.state_dict(),
                heads=heads.state_dict(),
                opt=opt.state_dict(),
                sched=sched.state_dict(),
                step=done,
            )
    tower.eval()
    if done < args.pretrain_steps:
        return None
    scores = probe(tower, heads, processor, n=PROBE_SCENES, split="val")
    print(f"stage 1's read-outs on {PROBE_SCENES} val scenes: {format_scores(scores)}", flush=True)
    return scores
