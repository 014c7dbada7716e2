"""Stage 1b (minutes): visual tokens that read like words. The ViT and projector learn to put each visual token
on the decoder's input embedding of a word naming what its patch shows (size, colour, shape, position), and
background patches on a comma, so the frozen decoder reads a picture almost like a sentence — what stage 2
starts from."""

from __future__ import annotations

import argparse
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ...data import easyvqa
from ...data.examples import IMAGE_SIZE, easyvqa_items, easyvqa_pool
from ...data.scenes import make_scene, scene_seed
from ..recipe import V1
from .evaluation import evaluate, format_scores
from .loop import autocast, batches, due, optimize, resume_vision, save_vision, schedule

BACKGROUND_WORD = ","


def patch_cover(mask: Image.Image, grid: int = V1.grid) -> torch.Tensor:
    """Fraction of each patch (grid × grid of them over the picture) a mask covers: [grid²]."""
    m = torch.from_numpy(np.asarray(mask.resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) / 255.0)
    cell = IMAGE_SIZE // grid
    return m.view(grid, cell, grid, cell).mean(dim=(1, 3)).flatten()


def patch_words(objects: list[tuple[list[str], torch.Tensor]], grid: int = V1.grid) -> list[str]:
    """A word per patch: each object's patches (cover > 0.3) cycle through its words in reading order; the
    rest read as the background word."""
    words = [BACKGROUND_WORD] * (grid * grid)
    for vocab, cover in objects:
        for k, patch in enumerate(torch.nonzero(cover > 0.3).flatten().tolist()):
            words[patch] = vocab[k % len(vocab)]
    return words


def _example(rng: random.Random, labels: dict, grid: int) -> tuple[Image.Image, list[str]]:
    """A training picture and its per-patch target words (scenes half the time, easy-VQA otherwise)."""
    if rng.random() < 0.5:
        scene = make_scene(scene_seed("train", rng.randrange(10**7)))
        objects = [
            ([o.size, o.color, o.shape, *o.position.split()], patch_cover(mask, grid))
            for o, mask in zip(scene.objects, scene.object_masks(IMAGE_SIZE), strict=True)
        ]
        return scene.render(IMAGE_SIZE), patch_words(objects, grid)
    pool = easyvqa_pool("train")
    while True:
        item = easyvqa_items("train")[pool[rng.randrange(len(pool))]]
        shape, color = labels.get(item.q.image_id, (None, None))
        if shape and color:
            break
    image = item.image_rgb()
    pixels = np.asarray(image, dtype=np.int32)
    mask = Image.fromarray(((np.abs(pixels - pixels[0, 0]).sum(-1) > 40) * 255).astype(np.uint8))
    return image, patch_words([([color, shape], patch_cover(mask, grid))], grid)


class WordTargets:
    """The decoder's input embedding of each word (the mean over its tokens, with a leading space)."""

    def __init__(self, adapter: Any) -> None:
        self.adapter, self.cache = adapter, {}

    def __call__(self, words: list[str]) -> torch.Tensor:
        for w in set(words) - set(self.cache):
            ids = self.adapter.tokenizer(w if w == BACKGROUND_WORD else " " + w, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                self.cache[w] = self.adapter.embed(torch.tensor([ids], device=self.adapter.device)).mean(1)[0]
        return torch.stack([self.cache[w] for w in words])  # [144, H]


def _batch(step: int, batch: int, processor: Any, labels: dict, grid: int) -> dict:
    rng = random.Random(7919 * step + 11)
    items = [_example(rng, labels, grid) for _ in range(batch)]
    return {
        "pixel_values": processor.image_processor([im for im, _ in items], return_tensors="pt")["pixel_values"],
        "words": [words for _, words in items],
    }


def ground(model: Any, processor: Any, args: argparse.Namespace) -> None:
    """Stage 1b: ViT + projector onto the word embeddings, MSE scaled by the mean squared embedding entry
    (checkpoint: WORK/ground.pt)."""
    from ...api import VLM

    vlm = VLM.from_model(model, processor)
    targets = WordTargets(vlm.adapter)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.ground_lr, weight_decay=0.0)
    sched = schedule(opt, args.ground_steps, 50)
    ckpt = args.work / "ground.pt"
    start = resume_vision(ckpt, model, opt, sched)
    labels = easyvqa.image_labels(easyvqa.load("train"))
    embeddings = vlm.adapter.embed(torch.arange(1000, device=args.device)[None]).detach()
    scale = embeddings.float().pow(2).mean()  # mean squared embedding entry
    bar = tqdm(range(start, args.ground_steps), initial=start, total=args.ground_steps, desc="ground")
    grid = args.recipe.grid
    data = batches(
        lambda step: _batch(step, args.pretrain_batch, processor, labels, grid), start, args.ground_steps, args
    )
    for step, batch in zip(bar, data, strict=False):
        want = torch.cat([targets(words) for words in batch["words"]]).float()  # [B·144, H]
        with autocast(args):
            got = vlm.adapter.image_features(batch["pixel_values"].to(args.device))  # [B·144, H]
        loss = F.mse_loss(got.float(), want) / scale
        optimize(loss, opt, sched, params, bar)
        if due(step + 1, args.save_every, args.ground_steps):
            save_vision(ckpt, model, opt, sched, step + 1)
    if args.eval_every:
        scores = evaluate(model, processor, args.eval_n, args.eval_describe)
        bar.write("after grounding: val " + format_scores(scores))
