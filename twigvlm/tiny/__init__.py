"""Tiny random models built offline from configs (no download): LLaVA-style (`llava`), Qwen-VL (`qwen`) and the
other families (`families`), each with a working processor. `twigvlm.tiny` keeps the LLaVA names it always had."""

from .llava import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    TinySpec,
    build_tiny_llava,
    build_tokenizer,
    demo_image,
    save_model_dir,
    save_tiny_llava,
    text_config,
)

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
