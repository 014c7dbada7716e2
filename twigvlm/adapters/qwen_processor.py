"""Processors where torchvision is missing: the stock processor class, minus its video processor.

The stock Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Video-LLaVA, LLaVA-OneVision and SmolVLM processors construct a video
processor that imports torchvision; where that import fails, `load_processor` builds the same stock class
(through a subclass whose only change is that it has no video-processor attribute) from the directory's image
processor, tokenizer, chat template and processor settings. Images then go through the stock code unchanged;
videos go through each adapter's own frame preprocessing. Where torchvision imports, the stock processor is
loaded unchanged.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any


def has_video_processor(processor: Any) -> bool:
    return getattr(processor, "video_processor", None) is not None


@functools.cache
def without_video(processor_cls: type) -> type:
    """`processor_cls` with (image_processor, tokenizer, chat_template) as its only parts.

    The stock `__init__` runs unchanged with `video_processor=None`; a shim between it and `ProcessorMixin` drops
    that None from the positional parts it hands on (whatever their order: Video-LLaVA puts the video processor
    second, the others third)."""
    from transformers import ProcessorMixin

    class _NoVideoParts(ProcessorMixin):
        def __init__(self, *parts, **kwargs):  # noqa: N807
            ProcessorMixin.__init__(self, *(p for p in parts if p is not None), **kwargs)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: N807
        processor_cls.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    # The stock signature minus the video processor: what `from_pretrained` loads and `save_pretrained` writes.
    stock = inspect.signature(processor_cls.__init__)
    __init__.__signature__ = stock.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in stock.parameters.items() if name != "video_processor"]
    )
    return type(processor_cls.__name__, (processor_cls, _NoVideoParts), {"__init__": __init__, "__module__": __name__})


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
    return without_video(processor_cls)(image_processor, tokenizer, chat_template=template, **_saved_kwargs(path))


def _saved_kwargs(path: str | Path) -> dict[str, Any]:
    """The processor's own settings in processor_config.json (patch size, tokens, …), not its parts."""
    config = Path(path) / "processor_config.json"
    saved = json.loads(config.read_text()) if config.is_file() else {}
    return {k: v for k, v in saved.items() if not isinstance(v, dict) and k not in ("processor_class", "auto_map")}


def processor_class(model_type: str) -> type:
    """The stock processor class of a model type in `PROCESSORS`."""
    import transformers

    return getattr(transformers, PROCESSORS[model_type])


# Model types whose stock processor carries a video processor (which needs torchvision), and that class's name.
PROCESSORS = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "video_llava": "VideoLlavaProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
    "llava_next_video": "LlavaNextVideoProcessor",
    "smolvlm": "SmolVLMProcessor",
}
