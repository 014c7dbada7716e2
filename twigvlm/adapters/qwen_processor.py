"""Qwen-VL processors where torchvision is missing: the stock processor class, minus its video processor.

The stock Qwen2-VL, Qwen2.5-VL and Qwen3-VL processors construct a video processor that imports torchvision;
where that import fails, `load_processor` builds the same stock class (through a subclass whose only change is
that it has no video-processor attribute) from the directory's image processor, tokenizer and chat template.
Images then go through the stock code unchanged; videos go through `qwen_video.py`. Where torchvision imports,
the stock processor is loaded unchanged.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


def has_video_processor(processor: Any) -> bool:
    return getattr(processor, "video_processor", None) is not None


@functools.cache
def without_video(processor_cls: type) -> type:
    """`processor_cls` with (image_processor, tokenizer, chat_template) as its only parts."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: N807
        processor_cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(processor_cls.__name__, (processor_cls,), {"__init__": __init__, "__module__": __name__})


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 — a broken torchvision install is as good as none here
        return False
    return True


def load_processor(path: str | Path, processor_cls: type) -> Any:
    """The stock processor of a saved Qwen-VL directory; without torchvision, the same class with no video part."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if torchvision_available():
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    template = getattr(tokenizer, "chat_template", None)
    template_file = Path(path) / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text()
    return without_video(processor_cls)(image_processor, tokenizer, chat_template=template)


def processor_class(model_type: str) -> type:
    """The stock processor class of a Qwen-VL model type."""
    import transformers

    names = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
    return getattr(transformers, names[model_type])
