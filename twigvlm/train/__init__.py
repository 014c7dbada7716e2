"""Twig training: LLaVA-format data, the twig-only objective (cross-entropy, optional KL distillation), the
Hugging Face Trainer recipe, and distillation data from the base's own answers.

Names are imported on first use, so `twigvlm generate` does not pay for importing the Trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "config",
    "DistillDataConfig": "config",
    "TrainConfig": "config",
    "Collator": "data",
    "LlavaDataset": "data",
    "load_records": "data",
    "TwigObjective": "objective",
    "TrainResult": "recipe",
    "TwigTrainer": "recipe",
    "train_twig": "recipe",
    "distill_data": "distill",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
