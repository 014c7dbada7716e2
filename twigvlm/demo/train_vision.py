"""Train the demo's vision tower and projector with the SmolLM2 decoder frozen: `python -m twigvlm.demo.train_vision`.

Stage 1 (`pretrain`, minutes on a CPU): the ViT alone, with small linear heads on pooled patch features —
per grid cell the colour, shape and size of the scene object there (or none), and for easy-VQA pictures the
shape and colour — so its features already say what is where.
Stage 1b (`ground`, minutes): the ViT and projector, so that each visual token lands on the decoder's input
embedding of a word naming what its patch shows — the frozen decoder then reads a picture almost like text.
Stage 2 (`align`, the long one): the assembled LLaVA; cross-entropy on the answers of the training mixture
(`twigvlm.demo.data`), gradients through the frozen decoder into the projector and the ViT.

Both stages checkpoint to --work every --save-every steps (weights, optimizer, schedule, step) and `--resume`
continues exactly (the data are a function of the step). The result is written to the package's
`demo/assets/vision.safetensors` in half precision. Prints how long it took.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..data import easyvqa
from ..data.scenes import COLORS, SHAPES, SIZES, make_scene, scene_seed
from .data import Example, easyvqa_items, easyvqa_pool, eval_set, training_stream
from .model import ASSETS, IMAGE_SIZE, PATCH_SIZE, VISION_WEIGHTS, build_demo, vision_prefixes, vision_state

GRID = IMAGE_SIZE // PATCH_SIZE  # 12 patches a side; a scene cell is GRID/3 patches a side


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
        t[o.cell] = torch.tensor([sorted(COLORS).index(o.color) + 1, SHAPES.index(o.shape) + 1,
                                  SIZES.index(o.size) + 1])
    return t


def _pretrain_batch(step: int, batch: int, processor, labels) -> dict[str, torch.Tensor]:  # noqa: ANN001
    import random

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
    return {"pixel_values": processor.image_processor(images, return_tensors="pt")["pixel_values"],
            "cells": torch.stack([_scene_targets(i) for i in scene_ids]), "whole": whole, "half": half}


def _pretrain_loss(tower: nn.Module, heads: AuxHeads, b: dict) -> torch.Tensor:
    feats = tower(pixel_values=b["pixel_values"], output_hidden_states=True).hidden_states[-1]  # [B, 144, W]
    cell, whole = heads(feats)
    h = b["half"]
    c, s = len(COLORS) + 1, len(SHAPES) + 1
    splits = (cell[:h, :, :c], cell[:h, :, c:c + s], cell[:h, :, c + s:])
    loss = sum(F.cross_entropy(x.reshape(-1, x.shape[-1]), b["cells"][..., k].reshape(-1))
               for k, x in enumerate(splits))
    n_shape = len(easyvqa.SHAPES)
    loss = loss + F.cross_entropy(whole[h:, :n_shape], b["whole"][:, 0], ignore_index=-100)
    return loss + F.cross_entropy(whole[h:, n_shape:], b["whole"][:, 1], ignore_index=-100)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _checkpoint(path: Path, **state) -> None:  # noqa: ANN003
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _resume_vision(ckpt: Path, model, opt, sched) -> int:  # noqa: ANN001
    """Restore the vision weights, optimizer and schedule of a stage's checkpoint; the step to continue at."""
    if not ckpt.is_file():
        return 0
    state = torch.load(ckpt, weights_only=False)
    model.load_state_dict(state["vision"], strict=False)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return state["step"]


def _save_vision(ckpt: Path, model, opt, sched, step: int) -> None:  # noqa: ANN001
    _checkpoint(ckpt, vision=vision_state(model, torch.float32), opt=opt.state_dict(), sched=sched.state_dict(),
                step=step)


def pretrain(model, processor, args) -> None:  # noqa: ANN001
    """Stage 1: the ViT and aux heads on per-cell / per-picture labels."""
    tower = model.model.vision_tower
    heads = AuxHeads(tower.config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, args.pretrain_steps, 50))
    ckpt, start = args.work / "pretrain.pt", 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        tower.load_state_dict(state["tower"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
    labels = easyvqa.image_labels(easyvqa.load("train"))
    tower.train()
    bar = tqdm(range(start, args.pretrain_steps), initial=start, total=args.pretrain_steps, desc="pretrain")
    for step in bar:
        loss = _pretrain_loss(tower, heads, _pretrain_batch(step, args.pretrain_batch, processor, labels))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % args.save_every == 0 or step + 1 == args.pretrain_steps:
            _checkpoint(ckpt, tower=tower.state_dict(), heads=heads.state_dict(), opt=opt.state_dict(),
                        sched=sched.state_dict(), step=step + 1)
    tower.eval()


# ---- stage 1b: grounding — visual tokens that read like words ----------------------------------------------
BACKGROUND_WORD = ","


def _patch_cover(mask: Image.Image) -> torch.Tensor:
    """Fraction of each 16-px patch a mask covers: [144]."""
    m = torch.from_numpy(np.asarray(mask.resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) / 255.0)
    return m.view(GRID, PATCH_SIZE, GRID, PATCH_SIZE).mean(dim=(1, 3)).flatten()


def _patch_words(objects: list[tuple[list[str], torch.Tensor]]) -> list[str]:
    """A word per patch: each object's patches (cover > 0.3) cycle through its words in reading order; the
    rest read as the background word."""
    words = [BACKGROUND_WORD] * (GRID * GRID)
    for vocab, cover in objects:
        for k, patch in enumerate(torch.nonzero(cover > 0.3).flatten().tolist()):
            words[patch] = vocab[k % len(vocab)]
    return words


def _ground_example(rng, labels) -> tuple[Image.Image, list[str]]:  # noqa: ANN001
    """A training picture and its per-patch target words (scenes half the time, easy-VQA otherwise)."""
    if rng.random() < 0.5:
        scene = make_scene(scene_seed("train", rng.randrange(10**7)))
        objects = [([o.size, o.color, o.shape, *o.position.split()], _patch_cover(mask))
                   for o, mask in zip(scene.objects, scene.object_masks(IMAGE_SIZE), strict=True)]
        return scene.render(IMAGE_SIZE), _patch_words(objects)
    pool = easyvqa_pool("train")
    while True:
        item = easyvqa_items("train")[pool[rng.randrange(len(pool))]]
        shape, color = labels.get(item.q.image_id, (None, None))
        if shape and color:
            break
    image = item.image_rgb()
    pixels = np.asarray(image, dtype=np.int32)
    mask = Image.fromarray(((np.abs(pixels - pixels[0, 0]).sum(-1) > 40) * 255).astype(np.uint8))
    return image, _patch_words([([color, shape], _patch_cover(mask))])


class WordTargets:
    """The decoder's input embedding of each word (the mean over its tokens, with a leading space)."""

    def __init__(self, adapter) -> None:  # noqa: ANN001
        self.adapter, self.cache = adapter, {}

    def __call__(self, words: list[str]) -> torch.Tensor:
        for w in set(words) - set(self.cache):
            ids = self.adapter.tokenizer(w if w == BACKGROUND_WORD else " " + w, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                self.cache[w] = self.adapter.embed(torch.tensor([ids])).mean(1)[0]
        return torch.stack([self.cache[w] for w in words])  # [144, H]


def ground(model, processor, args) -> None:  # noqa: ANN001
    """Stage 1b: ViT + projector so that each visual token lands on the decoder's embedding of a word naming
    what the patch shows (size, colour, shape, position), background patches on a comma. The frozen decoder
    then reads a picture almost like a sentence, which is what stage 2 starts from."""
    import random

    from ..api import VLM

    vlm = VLM.from_model(model, processor)
    targets = WordTargets(vlm.adapter)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.ground_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, args.ground_steps, 50))
    ckpt = args.work / "ground.pt"
    start = _resume_vision(ckpt, model, opt, sched)
    labels = easyvqa.image_labels(easyvqa.load("train"))
    scale = vlm.adapter.embed(torch.arange(1000)[None]).detach().pow(2).mean()  # mean squared embedding entry
    bar = tqdm(range(start, args.ground_steps), initial=start, total=args.ground_steps, desc="ground")
    for step in bar:
        rng = random.Random(7919 * step + 11)
        batch = [_ground_example(rng, labels) for _ in range(args.pretrain_batch)]
        pixels = processor.image_processor([im for im, _ in batch], return_tensors="pt")["pixel_values"]
        want = torch.cat([targets(words) for _, words in batch])  # [B·144, H]
        got = vlm.adapter.image_features(pixels)  # [B·144, H]
        loss = F.mse_loss(got, want) / scale
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % args.save_every == 0 or step + 1 == args.ground_steps:
            _save_vision(ckpt, model, opt, sched, step + 1)
    if args.eval_every:
        bar.write("after grounding: val exact match " + ", ".join(
            f"{k} {v:.2f}" for k, v in evaluate(vlm, args.eval_n).items()))


def _align_batch(adapter, examples: list[Example]) -> dict[str, torch.Tensor]:  # noqa: ANN001
    from ..train.data import IGNORE_INDEX, Collator, pad_token_id

    items = []
    for ex in examples:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]},
                    {"role": "assistant", "content": ex.answer}]
        ids, is_answer, pixels = adapter.tokenize_chat(messages, [ex.image()])
        items.append({"input_ids": torch.tensor(ids), "pixel_values": pixels,
                      "labels": torch.tensor([t if a else IGNORE_INDEX for t, a in zip(ids, is_answer, strict=True)])})
    return Collator(pad_token_id(adapter))(items)


def evaluate(vlm, n: int) -> dict[str, float]:  # noqa: ANN001
    """Exact match on the first n val questions of each short-answer source (greedy, our engine)."""
    scores = {}
    for source in ("scenes", "easyvqa"):
        hits = [vlm.generate(ex.question, ex.image(), max_new_tokens=8).text.strip().lower() == ex.answer
                for ex in eval_set(source, n, split="val")]
        scores[source] = sum(hits) / len(hits)
    return scores


def align(model, processor, args) -> None:  # noqa: ANN001
    """Stage 2: projector + ViT through the frozen decoder, on the answers of the training mixture."""
    from ..api import VLM

    vlm = VLM.from_model(model, processor)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(vision_prefixes()))
    groups = [{"params": list(model.model.multi_modal_projector.parameters()), "lr": args.align_lr},
              {"params": list(model.model.vision_tower.parameters()), "lr": args.align_lr * args.tower_lr_scale}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, args.align_steps, 30))
    ckpt = args.work / "align.pt"
    start = _resume_vision(ckpt, model, opt, sched)
    stream = training_stream(args.seed, start * args.align_batch)
    bar = tqdm(range(start, args.align_steps), initial=start, total=args.align_steps, desc="align")
    for step in bar:
        batch = _align_batch(vlm.adapter, list(itertools.islice(stream, args.align_batch)))
        model.train()
        loss = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        model.eval()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        done = step + 1
        if done % args.save_every == 0 or done == args.align_steps:
            _save_vision(ckpt, model, opt, sched, done)
        if args.eval_every and (done % args.eval_every == 0 or done == args.align_steps):
            bar.write(f"step {done}: val exact match " + ", ".join(
                f"{k} {v:.2f}" for k, v in evaluate(vlm, args.eval_n).items()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the demo VLM's vision tower and projector (decoder frozen).")
    ap.add_argument("--work", type=Path, default=Path("runs/demo-vision"), help="checkpoints (resumable)")
    ap.add_argument("--out", type=Path, default=ASSETS / VISION_WEIGHTS)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--pretrain-batch", type=int, default=32)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--ground-steps", type=int, default=600)
    ap.add_argument("--ground-lr", type=float, default=1e-3)
    ap.add_argument("--align-steps", type=int, default=800)
    ap.add_argument("--align-batch", type=int, default=8)
    ap.add_argument("--align-lr", type=float, default=1e-3)
    ap.add_argument("--tower-lr-scale", type=float, default=0.2, help="the ViT's lr relative to the projector's")
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    model, processor = build_demo(seed=args.seed, use_assets=False)  # random vision weights; checkpoints restore
    if not (args.work / "align.pt").is_file():
        if not (args.work / "ground.pt").is_file():
            pretrain(model, processor, args)
        ground(model, processor, args)
    align(model, processor, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(vision_state(model), str(args.out), metadata={"format": "pt"})
    print(f"wrote {args.out} in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
