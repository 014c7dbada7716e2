"""Adapter registry and model loading: a model directory (or an in-memory model) → the right `VLMAdapter`.

The registry knows model types, not names: "demo" and other named models are resolved in `twigvlm.inputs.named`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import TwigVLMError
from .base import Encoded, ModelSpec, Prompt, VLMAdapter
from .idefics3 import Idefics3Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter, LlavaNextVideoAdapter, LlavaOnevisionAdapter
from .qwen_vl import QwenVLAdapter
from .video_llava import VideoLlavaAdapter

FAMILIES = (
    LlavaAdapter,
    QwenVLAdapter,
    VideoLlavaAdapter,
    LlavaNextAdapter,
    LlavaNextVideoAdapter,
    LlavaOnevisionAdapter,
    Idefics3Adapter,
)
ADAPTERS: dict[str, type[VLMAdapter]] = {t: cls for cls in FAMILIES for t in cls.model_types}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = [
    "ADAPTERS",
    "DTYPES",
    "Encoded",
    "ModelSpec",
    "Prompt",
    "VLMAdapter",
    "adapter_for",
    "load_adapter",
    "parse_dtype",
]


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise TwigVLMError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str) -> torch.device:
    """A torch device that exists on this machine, or a one-line error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TwigVLMError(f"device {device!r} is not a torch device: use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        raise TwigVLMError(f"device {device!r} is not available on this machine: use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise TwigVLMError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def _supported() -> str:
    return ", ".join(sorted(ADAPTERS))


def adapter_for(model: Any, processor: Any) -> VLMAdapter:
    """Wrap an already loaded stock Hugging Face model and its processor."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise TwigVLMError(f"model type {model_type!r} is not a supported VLM: supported types are {_supported()}")
    return ADAPTERS[model_type](model, processor)


def adapter_class(config_file: Path) -> type[VLMAdapter] | None:
    """The adapter class a model's config.json names, read without loading the model; None where the file does not
    read as a config of a supported type (the load then says why)."""
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return ADAPTERS.get(model_type) if isinstance(model_type, str) else None


def load_adapter(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> VLMAdapter:
    """Load a saved Hugging Face VLM directory (config, weights, processor) with SDPA attention. Names such as
    "demo" are resolved above this registry, in `twigvlm.inputs.named`."""
    torch_dtype = parse_dtype(dtype)
    check_device(device)
    path = Path(path)
    if not path.is_dir():
        raise TwigVLMError(f"model directory {path} does not exist: pass a directory written by save_pretrained")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TwigVLMError(f"{path} has no config.json: pass a Hugging Face model directory (save_pretrained output)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise TwigVLMError(f"{config_file} is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise TwigVLMError(f"{config_file} is not a model config (a JSON object is expected)")
    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        raise TwigVLMError(
            f"{path} holds model type {model_type!r}, which is not a supported VLM: supported types are {_supported()}"
        )

    from transformers import AutoModelForImageTextToText

    try:
        processor = _load_processor(path, model_type)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch_dtype, attn_implementation="sdpa", local_files_only=True
        ).to(device)
    except Exception as e:  # noqa: BLE001 — any failure inside transformers' loader is a bad model directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TwigVLMError(f"could not load the model in {path} ({type(e).__name__}: {first[:300]})") from None
    return adapter_for(model, processor)


def _load_processor(path: Path, model_type: str) -> Any:
    """The directory's stock processor; for a family whose processor has a video part, without torchvision, the
    stock class without that part (`qwen_processor.py`)."""
    from transformers import AutoProcessor

    from .qwen_processor import PROCESSORS

    if model_type in PROCESSORS:
        from .qwen_processor import load_processor, processor_class

        return load_processor(path, processor_class(model_type))
    return AutoProcessor.from_pretrained(path, local_files_only=True)
