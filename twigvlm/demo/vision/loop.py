"""What every vision-training stage shares: deterministic per-step batches built by worker processes, the
warm-up + cosine schedule, one optimizer step, and checkpoints a re-run resumes from exactly."""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..lora import DecoderLoRA
from ..model import vision_state


def cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at `step`: linear warm-up, then a cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class Cosine:
    """The schedule's factor as an object, so that a checkpoint keeps its horizon and a budgeted run can shorten
    it (`total`) once it knows its speed."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        return cosine(step, self.total, self.warmup)


def schedule(opt: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, Cosine(total, warmup))


def fit_horizon(
    sched: torch.optim.lr_scheduler.LambdaLR, done: int, seconds_per_step: float, args: argparse.Namespace
) -> int:
    """The steps a budgeted run can finish: `done` plus what the time left (less `args.reserve_s` for the final
    validation and writing) allows at this speed, at most the planned total. Sets the schedule's horizon to it,
    so the cosine still reaches zero at the last step."""
    left = args.deadline - time.monotonic() - args.reserve_s
    total = max(done + 1, min(sched.lr_lambdas[0].total, done + int(left / seconds_per_step)))
    for f in sched.lr_lambdas:
        f.total = total
    return total


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


def batches(make: Callable[[int], dict], start: int, end: int, args: argparse.Namespace) -> Iterator[dict]:
    """The batches of steps start..end-1 in order, built by `args.workers` data processes."""
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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(args: argparse.Namespace) -> AbstractContextManager:
    """bf16 autocast when the run asked for it (`args.bf16`), else a no-op."""
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16)


def optimize(
    loss: torch.Tensor, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, params: list, bar: tqdm
) -> None:
    """One optimizer step of a stage: backward, clip to norm 1, step the optimizer and schedule, show the loss."""
    opt.zero_grad()
    loss.backward()
    apply_gradients(opt, sched, params, bar, loss.item())


def apply_gradients(
    opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, params: list, bar: tqdm, loss: float
) -> None:
    """The end of a step whose gradients are in place: clip to norm 1, step the optimizer and schedule, show the
    loss."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)


def out_of_time(args: argparse.Namespace) -> bool:
    """Whether the run's wall-clock budget (`args.deadline`, a time.monotonic() value, None: no budget) is spent."""
    deadline = getattr(args, "deadline", None)
    return deadline is not None and time.monotonic() >= deadline


def due(step: int, every: int, total: int) -> bool:
    """Whether a stage checkpoints (or validates) after finishing `step` steps."""
    return step % every == 0 or step == total


def default_workers() -> int:
    """Data processes by default: one per spare core, at most 8."""
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def checkpoint(path: Path, **state: Any) -> None:
    """torch.save through a temporary file, so an interrupted save never leaves a broken checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def resume_vision(
    ckpt: Path,
    model: Any,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    lora: DecoderLoRA | None = None,
) -> int:
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


def save_vision(
    ckpt: Path,
    model: Any,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    lora: DecoderLoRA | None = None,
) -> None:
    """Checkpoint the vision weights (and LoRA), optimizer, schedule and step for `resume_vision`."""
    checkpoint(
        ckpt,
        vision=vision_state(model, torch.float32),
        opt=opt.state_dict(),
        sched=sched.state_dict(),
        step=step,
        lora=lora.state_dict() if lora is not None else None,
    )
