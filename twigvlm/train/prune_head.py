"""`twigvlm train --objective pruning`: train the twig's pruning head (TwigVLM++'s P-Head, `twig/prune_head.py`)
to choose the visual tokens a deep base layer attends to, with the base and the twig frozen.

Per example of the LLaVA-format data (read as `twigvlm train` reads it), the prompt is the conversation up to its
first answer and the query is its last token — where inference scores. The teacher is base layer A's attention
from that token to the visual tokens, renormalised over them and averaged over heads (A = `--teacher-layer`,
default round(0.6·L): the follow-up distils from layer 20 of LLaVA-1.5-7B's 32); it is computed once per example,
and so is what the head reads (the frozen layers 1..K, the twig's first layers, its last layer's keys): a step runs
only that layer's query and the head's gates.
The student is the pruning head's score (a softmax over the same visual tokens). The loss is KL(teacher ‖
student), summed over the visual tokens and averaged over the examples of a step, with AdamW and a cosine
schedule. Reported before and after: the mean KL, and how many of the teacher's top R visual tokens the head's
top R holds (R = M/9, the paper's budget), on `--eval-data` (else on the training set).

Where it differs from the follow-up: the twig is not trained with the head (its first stage trains both, with
the answers' cross-entropy and a KL to the base's predictions) and there is no second, reinforcement stage.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters.capabilities import ChatTraining, require
from ..engine import Engine
from ..errors import TwigVLMError
from ..inputs.named import load_model, twig_directory
from ..runtime.cache import KVCache
from ..runtime.kernels import bulk_products
from ..twig.model import Twig, load_twig, read_twig_config, save_twig
from .config import TrainConfig, resolve_device
from .data import IGNORE_INDEX, LlavaDataset

TEACHER_SHARE = 0.6  # the default teacher layer: round(0.6·L)
KEEP_SHARE = 1 / 9  # R for the overlap metric: the paper's 64 of 576


@dataclass
class Example:
    """One prompt as the head sees it, cut after its query token: the teacher's row, and what the head's own
    attention reads (the frozen twig's last-layer input and keys, computed once: only the head trains)."""

    below: torch.Tensor  # [1, S, H] the input of the twig's last layer
    keys: torch.Tensor  # that layer's keys over the prompt (`project_kv`), with its positions' rotary
    position_ids: torch.Tensor  # the prompt's positions ([1, S], or M-RoPE's [3, 1, S])
    visual: torch.Tensor  # [S] bool: the visual tokens
    query: int  # the last prompt token's index
    teacher: torch.Tensor  # [M] base layer A's attention to the visual tokens, summing to 1


@dataclass
class PruneHeadResult:
    out: Path
    steps: int
    kl_before: float
    kl_after: float
    overlap_before: float
    overlap_after: float


def teacher_layer(cfg: TrainConfig, num_layers: int) -> int:
    A = cfg.teacher_layer if cfg.teacher_layer is not None else round(TEACHER_SHARE * num_layers)
    if not 1 <= A <= num_layers:
        raise TwigVLMError(f"--teacher-layer {A} is invalid: give a base layer from 1 to {num_layers}")
    return A


@torch.no_grad()
def _examples(engine: Engine, data: LlavaDataset, A: int, desc: str) -> list[Example]:
    """Encode each record's prompt; compute base layer A's attention row from its last token and the head's inputs
    (the frozen layers 1..K and the twig's, once per example: no gradient)."""
    adapter, twig = engine.adapter, engine.twig
    trainable = require(adapter, ChatTraining, "pruning-head training")
    K = twig.config.K
    out = []
    for i in tqdm(range(len(data)), desc=desc, leave=False):
        item = data[i]
        answers = (item["labels"] != IGNORE_INDEX).nonzero().flatten()
        if answers.numel() == 0:
            continue
        q = int(answers[0]) - 1  # the last prompt token
        ids = item["input_ids"][None, : q + 1].to(adapter.device)  # (the data set's tensors are on the CPU)
        enc = trainable.embed_inputs(ids, item["pixel_values"])
        if enc.num_visual_tokens == 0:
            continue
        pos, adds, visual = enc.position_ids, enc.layer_adds, enc.visual_mask[0]
        qidx = torch.tensor([q], device=adapter.device)
        with bulk_products():  # layers 1..min(K, A-1) once, then on to K (the twig's) and A-1 (the teacher's)
            first = min(K, A - 1)
            shared = engine.forward(None, enc.inputs_embeds, pos, 0, first, adds)  # [1, S, H]
            hidden_k = shared if first == K else engine.forward(None, shared, pos, first, K, adds)
            below = shared if first == A - 1 else engine.forward(None, shared, pos, first, A - 1, adds)
            caches = KVCache(len(twig.layers)).layers
            twig_below = engine._all_but_last(twig.layers, hidden_k, pos, caches)  # the twig's last layer's input
            twig_keys, _ = adapter.project_kv(twig.layers[-1], twig_below, adapter.rotary(twig_below, pos))
        layer = adapter.layers[A - 1]
        keys, _ = adapter.project_kv(layer, below, adapter.rotary(below, pos))
        rope = adapter.rotary(below, pos[..., qidx])
        probs = adapter.attention_probs(layer, below[:, qidx], rope, keys, qidx, allowed=visual)  # [1, heads, 1, S]
        out.append(Example(twig_below, twig_keys, pos, visual, q, probs.mean(dim=(1, 2))[0][visual]))
    return out


def _student(engine: Engine, twig: Twig, ex: Example) -> torch.Tensor:
    """The pruning head's scores [M] for one prompt: its gate on the twig's last attention, with gradient."""
    adapter, below = engine.adapter, ex.below
    qidx = torch.tensor([ex.query], device=below.device)
    rope = adapter.rotary(below, ex.position_ids[..., qidx])
    probs = adapter.attention_probs(
        twig.layers[-1], below[:, qidx], rope, ex.keys, qidx, gate=twig.prune_head, key_hidden=below, allowed=ex.visual
    )
    return probs.mean(dim=(1, 2))[0][ex.visual]  # [M]


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return (teacher * (teacher.clamp_min(1e-12).log() - student.clamp_min(1e-12).log())).sum()


@torch.no_grad()
def evaluate(engine: Engine, twig: Twig, examples: list[Example]) -> tuple[float, float]:
    """(mean KL(teacher ‖ head), mean share of the teacher's top R the head's top R holds), R = ⌈M/9⌉."""
    kls, overlaps = [], []
    for ex in examples:
        s = _student(engine, twig, ex)
        R = max(1, math.ceil(KEEP_SHARE * s.numel()))
        kls.append(float(_kl(ex.teacher, s)))
        overlaps.append(len(set(ex.teacher.topk(R).indices.tolist()) & set(s.topk(R).indices.tolist())) / R)
    return sum(kls) / len(kls), sum(overlaps) / len(overlaps)


def train_prune_head(cfg: TrainConfig) -> PruneHeadResult:
    """Add a pruning head to the --init twig (a fresh one, unless it has one) and train it; write the twig with its
    head to cfg.out."""
    cfg.validate()
    if cfg.init is None:
        raise TwigVLMError("--objective pruning trains the pruning head of an existing twig: give it with --init DIR")
    device = resolve_device(cfg.device)
    read_twig_config(twig_directory(cfg.init))  # its own files before the model load; its fit to it after
    adapter = load_model(cfg.model, dtype=torch.float32, device=device)
    twig = load_twig(adapter, twig_directory(cfg.init))
    twig.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    head = twig.prune_head if twig.prune_head is not None else twig.add_prune_head(adapter.query_width)
    head.requires_grad_(True)
    engine = Engine(adapter, twig)
    A = teacher_layer(cfg, adapter.spec.num_layers)
    with torch.no_grad():
        train = _examples(engine, LlavaDataset(cfg.data, adapter, cfg), A, "teacher rows (train)")
        held = (
            _examples(engine, LlavaDataset(cfg.eval_data, adapter, cfg), A, "teacher rows (eval)")
            if cfg.eval_data
            else train
        )
    if not train:
        raise TwigVLMError(
            f"{cfg.data} has no record with a picture and an answer: the pruning head has nothing to learn"
        )
    kl0, overlap0 = evaluate(engine, twig, held)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, round(cfg.epochs * steps_per_epoch))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, round(cfg.warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    order = torch.Generator().manual_seed(cfg.seed)
    t0, step = time.perf_counter(), 0
    with tqdm(total=steps, desc="pruning head") as bar:
        while step < steps:
            for batch in torch.randperm(len(train), generator=order).split(cfg.batch_size):
                loss = sum(_kl(train[i].teacher, _student(engine, twig, train[i])) for i in batch.tolist()) / len(batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                if step % cfg.logging_steps == 0:
                    bar.set_postfix(kl=f"{loss.item():.4f}")
                if step >= steps:
                    break
    kl1, overlap1 = evaluate(engine, twig, held)
    out = save_twig(twig, cfg.out, dtype=getattr(torch, cfg.save_dtype))
    print(f"pruning head: {step} steps in {time.perf_counter() - t0:.0f} s, teacher base layer {A}", flush=True)
    return PruneHeadResult(out, step, kl0, kl1, overlap0, overlap1)
