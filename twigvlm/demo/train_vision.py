"""Train the demo's vision tower and projector with the SmolLM2 decoder frozen: `python -m twigvlm.demo.train_vision`.

Stage 1 (`pretrain`, minutes on a CPU): the ViT alone, with small linear heads on pooled patch features —
per grid cell the colour, shape and size of the scene object there (or none), and for easy-VQA pictures the
shape and colour — so its features already say what is where.
Stage 1b (`ground`, minutes): the ViT and projector, so that each visual token lands on the decoder's input
embedding of a word naming what its patch shows — the frozen decoder then reads a picture almost like text.
Stage 2 (`align`, the long one): the assembled LLaVA; cross-entropy on the answers of the training mixture
(`twigvlm.demo.data`), gradients through the frozen decoder into the projector and the ViT.

With `--lora-rank r` (the default) stage 2 also trains rank-r adapters on the decoder's linear layers; they
ship beside the vision weights and are merged into the decoder at load (`twigvlm.demo.lora`).

Every stage checkpoints to --work every --save-every steps (weights, optimizer, schedule, step) and a re-run
continues exactly (each step's batch is a pure function of the step, built by --workers data processes). The
result is written to the package's `demo/assets/` in half precision. Prints how long it took. `--device cuda`
trains on a GPU (bf16 autocast); the defaults are the shipped recipe.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
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
from .data import Example, easyvqa_items, easyvqa_pool, training_stream
from .lora import DecoderLoRA
from .model import (
    ASSETS,
    IMAGE_SIZE,
    LORA_WEIGHTS,
    PATCH_SIZE,
    VISION_WEIGHTS,
    build_demo,
    vision_prefixes,
    vision_state,
)

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
        t[o.cell] = torch.tensor(
            [sorted(COLORS).index(o.color) + 1, SHAPES.index(o.shape) + 1, SIZES.index(o.size) + 1]
        )
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
    return {
        "pixel_values": processor.image_processor(images, return_tensors="pt")["pixel_values"],
        "cells": torch.stack([_scene_targets(i) for i in scene_ids]),
        "whole": whole,
        "half": half,
    }


def _pretrain_loss(tower: nn.Module, heads: AuxHeads, b: dict) -> torch.Tensor:
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


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class _Steps(torch.utils.data.IterableDataset):
    """The batches of steps start..end-1, `make(step)` each; worker w of n builds the steps ≡ w (mod n), and the
    loader's round-robin hands them back in step order."""

    def __init__(self, make: Callable[[int], dict], start: int, end: int) -> None:
        super().__init__()
        self.make, self.start, self.end = make, start, end

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        k, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + k, self.end, n):
            yield self.make(step)


def _batches(make: Callable[[int], dict], start: int, end: int, args) -> Iterator[dict]:  # noqa: ANN001
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workers = min(args.workers, max(0, end - start))
    return iter(
        torch.utils.data.DataLoader(
            _Steps(make, start, end),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )
    )


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _autocast(args):  # noqa: ANN001, ANN202
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16)


def _optimize(loss: torch.Tensor, opt, sched, params: list, bar) -> None:  # noqa: ANN001
    """One optimizer step of a stage: backward, clip to norm 1, step the optimizer and schedule, show the loss."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def default_workers() -> int:
    """Data processes by default: one per spare core, at most 8."""
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def _checkpoint(path: Path, **state) -> None:  # noqa: ANN003
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _resume_vision(ckpt: Path, model, opt, sched, lora: DecoderLoRA | None = None) -> int:  # noqa: ANN001
    """Restore the vision weights (and LoRA), optimizer and schedule of a stage's checkpoint; the step to continue
    at."""
    if not ckpt.is_file():
        return 0
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    model.load_state_dict(state["vision"], strict=False)
    if lora is not None and state.get("lora") is not None:
        lora.load_state_dict(state["lora"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return state["step"]


def _save_vision(ckpt: Path, model, opt, sched, step: int, lora: DecoderLoRA | None = None) -> None:  # noqa: ANN001
    _checkpoint(
        ckpt,
        vision=vision_state(model, torch.float32),
        opt=opt.state_dict(),
        sched=sched.state_dict(),
        step=step,
        lora=lora.state_dict() if lora is not None else None,
    )


def pretrain(model, processor, args) -> None:  # noqa: ANN001
    """Stage 1: the ViT and aux heads on per-cell / per-picture labels."""
    tower = model.model.vision_tower
    heads = AuxHeads(tower.config.hidden_size).to(args.device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, args.pretrain_steps, 50))
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
    data = _batches(
        lambda step: _pretrain_batch(step, args.pretrain_batch, processor, labels), start, args.pretrain_steps, args
    )
    for step, batch in zip(bar, data, strict=False):
        with _autocast(args):
            loss = _pretrain_loss(tower, heads, _to(batch, args.device))
        _optimize(loss, opt, sched, params, bar)
        if (step + 1) % args.save_every == 0 or step + 1 == args.pretrain_steps:
            _checkpoint(
                ckpt,
                tower=tower.state_dict(),
                heads=heads.state_dict(),
                opt=opt.state_dict(),
                sched=sched.state_dict(),
                step=step + 1,
            )
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
        objects = [
            ([o.size, o.color, o.shape, *o.position.split()], _patch_cover(mask))
            for o, mask in zip(scene.objects, scene.object_masks(IMAGE_SIZE), strict=True)
        ]
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
                self.cache[w] = self.adapter.embed(torch.tensor([ids], device=self.adapter.device)).mean(1)[0]
        return torch.stack([self.cache[w] for w in words])  # [144, H]


def _ground_batch(step: int, batch: int, processor, labels) -> dict:  # noqa: ANN001
    import random

    rng = random.Random(7919 * step + 11)
    items = [_ground_example(rng, labels) for _ in range(batch)]
    return {
        "pixel_values": processor.image_processor([im for im, _ in items], return_tensors="pt")["pixel_values"],
        "words": [words for _, words in items],
    }


def ground(model, processor, args) -> None:  # noqa: ANN001
    """Stage 1b: ViT + projector so that each visual token lands on the decoder's embedding of a word naming
    what the patch shows (size, colour, shape, position), background patches on a comma. The frozen decoder
    then reads a picture almost like a sentence, which is what stage 2 starts from."""
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
    embeddings = vlm.adapter.embed(torch.arange(1000, device=args.device)[None]).detach()
    scale = embeddings.float().pow(2).mean()  # mean squared embedding entry
    bar = tqdm(range(start, args.ground_steps), initial=start, total=args.ground_steps, desc="ground")
    data = _batches(
        lambda step: _ground_batch(step, args.pretrain_batch, processor, labels), start, args.ground_steps, args
    )
    for step, batch in zip(bar, data, strict=False):
        want = torch.cat([targets(words) for words in batch["words"]]).float()  # [B·144, H]
        with _autocast(args):
            got = vlm.adapter.image_features(batch["pixel_values"].to(args.device))  # [B·144, H]
        loss = F.mse_loss(got.float(), want) / scale
        _optimize(loss, opt, sched, params, bar)
        if (step + 1) % args.save_every == 0 or step + 1 == args.ground_steps:
            _save_vision(ckpt, model, opt, sched, step + 1)
    if args.eval_every:
        bar.write("after grounding: val " + _scores(evaluate(model, processor, args.eval_n, args.eval_describe)))


def _align_batch(adapter, examples: list[Example]) -> dict[str, torch.Tensor]:  # noqa: ANN001
    from ..train.data import IGNORE_INDEX, Collator, pad_token_id

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


@torch.no_grad()
def _answers(model, processor, samples, max_new_tokens: int, batch: int = 32) -> list[str]:  # noqa: ANN001
    """Greedy answers of stock HF `generate`, left-padded batches."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    try:
        for i in range(0, len(samples), batch):
            chunk = samples[i : i + batch]
            texts = [
                processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.prompt}]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for s in chunk
            ]
            inputs = processor(text=texts, images=[s.image() for s in chunk], return_tensors="pt", padding=True)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            out += tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def evaluate(model, processor, n: int, n_describe: int = 0, split: str = "val") -> dict[str, float]:  # noqa: ANN001
    """Exact match on the first n questions of each short-answer set and object-F1 on the first n_describe
    descriptions of `split` (greedy, stock HF generate)."""
    from ..bench.tasks import MAX_NEW_TOKENS, SHORT_MAX_NEW_TOKENS, builtin

    scores = {}
    for task, count in (("scenes", n), ("easyvqa", n), ("describe", n_describe)):
        if count:
            samples = builtin(task, count, split)
            texts = _answers(model, processor, samples, MAX_NEW_TOKENS.get(task, SHORT_MAX_NEW_TOKENS))
            scores[task] = sum(s.score(t) for s, t in zip(samples, texts, strict=True)) / len(samples)
    return scores


def _scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def align(model, processor, args) -> DecoderLoRA | None:  # noqa: ANN001
    """Stage 2: projector + ViT (+ decoder LoRA) through the decoder, on the answers of the training mixture."""
    from ..api import VLM

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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, args.align_steps, 100))
    ckpt = args.work / "align.pt"
    start = _resume_vision(ckpt, model, opt, sched, lora)

    def make(step: int) -> dict:
        examples = itertools.islice(training_stream(args.seed, step * args.align_batch), args.align_batch)
        return _align_batch(vlm.adapter, list(examples))

    bar = tqdm(range(start, args.align_steps), initial=start, total=args.align_steps, desc="align")
    for step, batch in zip(bar, _batches(make, start, args.align_steps, args), strict=False):
        batch = _to(batch, args.device)
        model.train()
        with _autocast(args):
            loss = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        _optimize(loss, opt, sched, [p for g in groups for p in g["params"]], bar)
        model.eval()
        done = step + 1
        if done % args.save_every == 0 or done == args.align_steps:
            _save_vision(ckpt, model, opt, sched, done, lora)
        if args.eval_every and (done % args.eval_every == 0 or done == args.align_steps):
            with _autocast(args):
                bar.write(f"step {done}: val " + _scores(evaluate(model, processor, args.eval_n, args.eval_describe)))
    return lora


def main(argv: list[str] | None = None) -> None:
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
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    args.device = torch.device(device)
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and device == "cuda")
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    model, processor = build_demo(seed=args.seed, use_assets=False)  # random vision weights; checkpoints restore
    model.to(args.device)
    if not (args.work / "align.pt").is_file():
        if not (args.work / "ground.pt").is_file():
            pretrain(model, processor, args)
        ground(model, processor, args)
    lora = align(model, processor, args)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(vision_state(model), str(args.out / VISION_WEIGHTS), metadata={"format": "pt"})
    if lora is not None:
        save_file(
            lora.state(),
            str(args.out / LORA_WEIGHTS),
            metadata={"format": "pt", "lora_rank": str(lora.rank), "lora_alpha": str(lora.alpha)},
        )
    elif (args.out / LORA_WEIGHTS).is_file():
        (args.out / LORA_WEIGHTS).unlink()
    print(f"wrote {args.out / VISION_WEIGHTS} in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
