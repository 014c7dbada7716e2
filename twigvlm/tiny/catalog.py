"""The tiny random models `twigvlm tiny` writes, by family name, and which module builds each. It imports no
torch, so the command's flags list the families without waiting for it."""

from __future__ import annotations

QWEN_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")  # built by `qwen.py`
OTHER_FAMILIES = ("video-llava", "llava-next", "llava-next-video", "llava-onevision", "idefics3")  # `families.py`
TINY_FAMILIES = ("llava", *QWEN_FAMILIES, *OTHER_FAMILIES)  # "llava": `llava.py`
