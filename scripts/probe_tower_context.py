"""Does stage 1's picture-level objective make the v2 tower's tokens carry the picture? A CPU-sized check of the
v2 recipe's second lever before any GPU time.

For each context weight (0: v1's targets only, per 3×3 cell; the recipe's: every token and the pool must also
predict the picture's bag of objects, colours, shapes, sizes, places and count), stage 1 trains the same fresh
8-layer, 576-token tower for --steps steps; then, on the frozen tower, a linear probe per setting learns the
scene's objects (colour and shape pairs, the bits a description names) from the mean of k tokens drawn at random,
k = 1, 64 (M/9, the paper's budget) and 576 (all). The probes train on --train scenes and are scored on --val
other scenes (micro-F1 over the object bits, threshold 0.5). A tower whose tokens carry the picture keeps its
all-token F1 at k = 64 and k = 1; one whose tokens carry only their own patch loses it, as random pruning does.
The per-cell accuracy (what is in each cell, from the cell's pooled tokens) says what locality each keeps.

    python scripts/probe_tower_context.py --steps 150 --batch 16 --out runs/probe-context.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from twigvlm.data.examples import IMAGE_SIZE
from twigvlm.data.scenes import make_scene, scene_seed
from twigvlm.demo.model import build_demo
from twigvlm.demo.recipe import V2
from twigvlm.demo.train_vision import parse_args
from twigvlm.demo.vision import pretrain as stage1
from twigvlm.runtime.machine import speed_flags

KS = (1, 64, 576)
PAIRS = len(stage1.PAIRS)


@torch.no_grad()
def _features(tower, processor, split: str, n: int, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen tokens [n, N, W], object bits [n, PAIRS] and cell targets [n, 9, 3]."""
    feats, bags, cells = [], [], []
    for i in range(0, n, batch):
        scenes = [make_scene(scene_seed(split, j)) for j in range(i, min(n, i + batch))]
        pixels = processor.image_processor([s.render(IMAGE_SIZE) for s in scenes], return_tensors="pt")["pixel_values"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        feats.append(out.float())
        bags += [stage1.scene_bag(list(s.objects))[:PAIRS] for s in scenes]
        cells += [stage1.cell_targets(list(s.objects)) for s in scenes]
    return torch.cat(feats), torch.stack(bags), torch.stack(cells)


def _subset_mean(feats: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Each picture's mean over k of its tokens drawn at random: [n, W] (feats fp32 [n, N, W])."""
    n, m, _ = feats.shape
    if k >= m:
        return feats.mean(1)
    idx = torch.rand(n, m, generator=gen).argsort(1)[:, :k]  # [n, k]
    return feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1])).mean(1)


def _probe_f1(train: tuple, val: tuple, k: int, steps: int = 300) -> float:
    """A linear probe from k random tokens' mean to the object bits: micro-F1 on val."""
    gen = torch.Generator().manual_seed(k)
    (xf, yb), (vf, vb) = train, val
    probe = torch.nn.Linear(xf.shape[-1], PAIRS)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(steps):  # a fresh draw of tokens every step: the probe learns from any k of them
        loss = F.binary_cross_entropy_with_logits(probe(_subset_mean(xf, k, gen)), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        guess = probe(_subset_mean(vf, k, gen)) > 0
    tp = (guess & (vb > 0)).sum().item()
    return 2 * tp / max(1, guess.sum().item() + (vb > 0).sum().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train", type=int, default=512, help="scenes the probes learn from")
    ap.add_argument("--val", type=int, default=256, help="other scenes they are scored on")
    ap.add_argument("--weights", default=f"0,{V2.context_weight:g}", help="context weights to compare")
    ap.add_argument("--work", type=Path, default=Path("runs/probe-context"))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    report: dict = {"cpu_flags": speed_flags(), "steps": a.steps, "batch": a.batch, "settings": {}}
    for weight in (float(w) for w in a.weights.split(",")):
        recipe = dataclasses.replace(V2, context_weight=weight)
        argv = ["--recipe", "v2", "--precision", "bf16", "--workers", "1", "--work", str(a.work / f"w{weight:g}")]
        args = parse_args([*argv, "--pretrain-steps", str(a.steps), "--pretrain-batch", str(a.batch)])
        args.recipe = recipe
        args.work.mkdir(parents=True, exist_ok=True)
        model, processor = build_demo(use_assets=False, recipe=recipe, progress=False)
        t = time.perf_counter()
        stage1.pretrain(model, processor, args)
        trained = time.perf_counter() - t
        tower = model.model.vision_tower.eval()
        xf, yb, xc = _features(tower, processor, "train", a.train)
        vf, vb, vc = _features(tower, processor, "val", a.val)
        f1 = {str(k): round(_probe_f1((xf, yb), (vf, vb), k), 3) for k in KS}
        cell = _cell_accuracy((xf, xc), (vf, vc))
        report["settings"][f"context {weight:g}"] = {"train_s": round(trained), "object_f1": f1, "cell_acc": cell}
        print(json.dumps({f"context {weight:g}": report["settings"][f"context {weight:g}"]}), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.out}", file=sys.stderr)


def _cell_accuracy(train: tuple, val: tuple, steps: int = 300) -> float:
    """A linear probe from each 3×3 cell's pooled tokens to its (colour, shape, size) classes: accuracy on val."""
    heads = stage1.AuxHeads(train[0].shape[-1])
    opt = torch.optim.Adam(heads.cell.parameters(), lr=1e-2)
    with torch.no_grad():
        grid = stage1.cell_pool(train[0]), stage1.cell_pool(val[0])  # [n, 9, W]
    for _ in range(steps):
        logits = heads.cell(grid[0])  # [n, 9, 17]
        loss = sum(
            F.cross_entropy(logits[..., part].flatten(0, 1), train[1][..., i].reshape(-1))
            for i, part in enumerate(stage1.CELL_SPLITS)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = heads.cell(grid[1])
        right = [
            (logits[..., part].argmax(-1) == val[1][..., i]).float().mean() for i, part in enumerate(stage1.CELL_SPLITS)
        ]
    return round(float(sum(right) / len(right)), 3)


if __name__ == "__main__":
    main()
