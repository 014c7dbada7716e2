"""`twigvlm train` and `twigvlm distill-data`: their flags are generated from the config dataclasses."""

from __future__ import annotations

import argparse
import os
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from .config import DistillDataConfig, TrainConfig


def _flag(name: str, meta: dict[str, Any]) -> str:
    return meta.get("flag") or "--" + name.replace("_", "-")


def _scalar_type(hint: Any) -> type:
    """int / float / str / bool from a resolved annotation such as `int | None`."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field: booleans are switches; `required` fields have no default."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = dict(f.metadata)
        kind = _scalar_type(hints[f.name])
        default = None if f.default is MISSING else f.default
        if kind is bool:
            parser.add_argument(_flag(f.name, meta), dest=f.name, action="store_true", help=meta["help"])
            continue
        shown = "" if meta.get("required") or default is None or "default" in meta["help"] else f" (default: {default})"
        parser.add_argument(
            _flag(f.name, meta),
            dest=f.name,
            type=kind,
            default=default,
            required=bool(meta.get("required")),
            choices=meta.get("choices"),
            metavar=None if meta.get("choices") else f.name.upper(),
            help=meta["help"] + shown,
        )


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def add_parsers(sub: Any) -> None:
    t = sub.add_parser(
        "train",
        help="train a twig on LLaVA-format data (frozen base; Trainer/accelerate)",
        description="Train a twig on a frozen VLM. Multi-GPU / multi-process: start it with "
        "`torchrun --nproc_per_node N -m twigvlm.cli train ...` or `accelerate launch`.",
    )
    add_config_args(t, TrainConfig)
    d = sub.add_parser("distill-data", help="answer a LLaVA-format file's prompts with the base's greedy output")
    add_config_args(d, DistillDataConfig)


def cmd_train(args: argparse.Namespace) -> None:
    cfg = config_from_args(TrainConfig, args)
    cfg.validate()  # before torch, the Trainer and the model load
    import torch.distributed as dist

    from .recipe import train_twig

    if cfg.objective == "pruning":
        from .prune_head import train_prune_head

        r = train_prune_head(cfg)
        print(
            f"twig with its pruning head written to {r.out} ({r.steps} steps); KL to the teacher {r.kl_before:.4f} "
            f"→ {r.kl_after:.4f}, the teacher's top M/9 held {r.overlap_before:.3f} → {r.overlap_after:.3f}",
            flush=True,
        )
        return
    try:
        result = train_twig(cfg)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    line = f"twig written to {result.out} ({result.steps} steps, mean training loss {result.train_loss:.4f})"
    if result.eval_after:
        was = result.eval_before.get("eval_before_agreement")
        now = result.eval_after["eval_agreement"]
        line += f"; agreement with the base's greedy tokens {now:.3f}" + (
            f" (was {was:.3f})" if was is not None else ""
        )
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, flush=True)


def cmd_distill_data(args: argparse.Namespace) -> None:
    cfg = config_from_args(DistillDataConfig, args)
    cfg.validate()  # before torch and the model load
    from .distill import distill_data

    out, records, answers = distill_data(cfg)
    print(f"wrote {records} record(s) with {answers} generated answer(s) to {out}")
