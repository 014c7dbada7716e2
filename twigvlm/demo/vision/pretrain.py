"""Stage 1 (minutes on a CPU): the ViT alone, with small linear heads on pooled patch features — per grid cell
the colour, shape and size of the scene object there (or none), and for easy-VQA pictures the shape and colour
— so that its features already say what is where before the decoder ever sees them."""

from __future__ import annotations

import argparse
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...data import easyvqa
from ...data.examples import IMAGE_SIZE, easyvqa_items, easyvqa_pool
from ...data.scenes import COLORS, SHAPES, SIZES, make_scene, scene_seed
from ..model import GRID
from .loop import autocast, batches, checkpoint, due, optimize, schedule, to_device


class AuxHeads(nn.Module):
    """Linear read-outs used only in stage 1: per cell (colour, shape, size incl. "none"); per picture (easy-VQA)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.cell = nn.Linear(width, (len(COLORS) + 1) + (len(SHAPES) + 1) + (len(SIZES) + 1))
        self.whole = nn.Linear(width, len(easyvqa.SHAPES) + len(easyvqa.COLORS))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, w = feats.shape  # [B, 144, W]
        grid = feats.view(b, 3, GRID // 3, 3, GRID // 3, w).mean(dim=(2, 4)).reshape(b, 9, w)  # [B, 9, W]
        return self.cell(grid), self.whole(feats.mean(1))  # [B, 9, 17], [B, 11]


def _scene_targets(index: int) -> torch.Tensor:
    """[9, 3] class ids per cell: colour, shape, size (0 = empty)."""
    t = torch.zeros(9, 3, dtype=torch.long)
    for o in make_scene(scene_seed("train", index)).objects:
        t[o.cell] = torch.tensor(
            [sorted(COLORS).index(o.color) + 1, SHAPES.index(o.shape) + 1, SIZES.index(o.size) + 1]
        )
    return t


def _batch(step: int, batch: int, processor: Any, labels: dict) -> dict[str, torch.Tensor]:
    """Step `step`'s pictures: half scenes (per-cell targets), half easy-VQA (shape and colour, -100 if unknown)."""
    rng = random.Random(10_007 * step + 3)
    half = batch // 2
    scene_ids = [rng.randrange(10**7) for _ in range(half)]
    pool = easyvqa_pool("train")
    evqa = [easyvqa_items("train")[pool[rng.randrange(len(pool))]] for _ in range(batch - half)]
    images = [make_scene(scene_seed("train", i)).render(IMAGE_SIZE) for i in scene_ids] + [e.image_rgb() for e in evqa]
    whole = torch.full((batch - half, 2), -100, dtype=torch.long)
    for k, e in enumerate(evqa):
        shape, color = labels.get(e.q.image_id, (None, None))
        if shape:
            whole[k, 0] = easyvqa.SHAPES.index(shape)
        if color:
            whole[k, 1] = easyvqa.COLORS.index(color)
    return {
        "pixel_values": processor.image_processor(images, return_tensors="pt")["pixel_values"],
        "cells": torch.stack([_scene_targets(i) for i in scene_ids]),
        "whole": whole,
        "half": half,
    }


def _loss(tower: nn.Module, heads: AuxHeads, b: dict) -> torch.Tensor:
    feats = tower(pixel_values=b["pixel_values"], output_hidden_states=True).hidden_states[-1]  # [B, 144, W]
    cell, whole = heads(feats)
    h = b["half"]
    c, s = len(COLORS) + 1, len(SHAPES) + 1
    splits = (cell[:h, :, :c], cell[:h, :, c : c + s], cell[:h, :, c + s :])
    loss = sum(
        F.cross_entropy(x.reshape(-1, x.shape[-1]), b["cells"][..., k].reshape(-1)) for k, x in enumerate(splits)
    )
    n_shape = len(easyvqa.SHAPES)
    loss = loss + F.cross_entropy(whole[h:, :n_shape], b["whole"][:, 0], ignore_index=-100)
    return loss + F.cross_entropy(whole[h:, n_shape:], b["whole"][:, 1], ignore_index=-100)


def pretrain(model: Any, processor: Any, args: argparse.Namespace) -> None:
    """Stage 1: the ViT and aux heads on per-cell / per-picture labels (checkpoint: WORK/pretrain.pt)."""
    tower = model.model.vision_tower
    heads = AuxHeads(tower.config.hidden_size).to(args.device)
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
    data = batches(lambda step: _batch(step, args.pretrain_batch, processor, labels), start, args.pretrain_steps, args)
    for step, batch in zip(bar, data, strict=False):
        with autocast(args):
            loss = _loss(tower, heads, to_device(batch, args.device))
        optimize(loss, opt, sched, params, bar)
        if due(step + 1, args.save_every, args.pretrain_steps):
            checkpoint(
                ckpt,
                tower=tower.state_dict(),
                heads=heads.state_dict(),
                opt=opt.state_dict(),
                sched=sched.state_dict(),
                step=step + 1,
            )
    tower.eval()
