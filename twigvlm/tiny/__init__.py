"""Tiny random models built offline from configs (no download): LLaVA-style (`llava`), Qwen-VL (`qwen`) and the
other families (`families`), each with a working processor; `catalog` names them. `twigvlm.tiny` keeps the LLaVA
names it always had, imported from `llava` on first use (so `tiny.catalog` stays free of torch)."""

from __future__ import annotations

from typing import Any

__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "SPECIAL_TOKENS",
    "TinySpec",
    "build_tiny_llava",
    "build_tokenizer",
    "demo_image",
    "save_model_dir",
    "save_tiny_llava",
    "text_config",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'twigvlm.tiny' has no attribute {name!r}")
    from . import llava

    return getattr(llava, name)
