"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models built offline from configs, with working processors.

A byte-level BPE tokenizer with the Qwen special tokens, a ChatML template that writes
`<|vision_start|><|image_pad|><|vision_end|>` (and `<|video_pad|>`) as the real ones do, the stock PIL image
processor at a small pixel budget, and the stock `*ForConditionalGeneration` class with 3-D M-RoPE (interleaved
and with deepstack for Qwen3-VL). `save_tiny_qwen` writes the directory `save_pretrained` would write, including
the video processor's config, so it loads back as a real checkpoint does — with or without torchvision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.qwen_processor import without_video
from .catalog import QWEN_FAMILIES as FAMILIES
from .llava import build_tokenizer

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyQwenSpec:
    """Shape of a tiny random Qwen-VL. Images are resized to between min_pixels and max_pixels (multiples of
    (patch · merge)²): 32×32 → 2×2 tokens, 64×64 → 4×4 tokens."""

    family: str = "qwen2-vl"
    num_layers: int = 6
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    patch_size: int = 8
    min_pixels: int = 32 * 32
    max_pixels: int = 64 * 64
    vocab_size: int = 600
    tie_embeddings: bool = True
    init_std: float = 0.1
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _mrope(spec: TinyQwenSpec) -> list[int]:
    """The three M-RoPE sections (temporal, height, width) over head_dim / 2 rotary pairs."""
    half = spec.head_dim // 2
    t = half - 2 * (3 * half // 8)
    return [t, 3 * half // 8, 3 * half // 8]


def _config(spec: TinyQwenSpec, tokenizer, vocab: int):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    text = dict(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=2048,
        initializer_range=spec.init_std,
        tie_word_embeddings=spec.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope(spec)},
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    vision = dict(
        depth=2,
        num_heads=4,
        patch_size=spec.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        initializer_range=spec.init_std,
    )
    if spec.family == "qwen2-vl":
        vision.update(embed_dim=32, hidden_size=spec.hidden_size, mlp_ratio=2)
        cls = Qwen2VLConfig
    elif spec.family == "qwen2.5-vl":
        # window attention on block 0, full attention on block 1 (as the real tower alternates them)
        vision.update(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=spec.hidden_size,
            window_size=2 * spec.patch_size * 2,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        )
        cls = Qwen2_5_VLConfig
    elif spec.family == "qwen3-vl":
        text.update(head_dim=spec.head_dim)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=spec.hidden_size,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        )
        cls = Qwen3VLConfig
    else:
        raise ValueError(f"unknown tiny Qwen family {spec.family!r}: use one of {', '.join(FAMILIES)}")
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=spec.tie_embeddings, **ids)


def _image_processor(spec: TinyQwenSpec):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        **({"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if spec.family == "qwen3-vl" else {}),
    )


def video_processor_config(spec: TinyQwenSpec) -> dict:
    """What the stock video processor's `save_pretrained` writes for this spec (its defaults at a small budget)."""
    image = _image_processor(spec)
    family_class = {
        "qwen2-vl": "Qwen2VLVideoProcessor",
        "qwen2.5-vl": "Qwen2VLVideoProcessor",
        "qwen3-vl": "Qwen3VLVideoProcessor",
    }[spec.family]
    return {
        "video_processor_type": family_class,
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_sample_frames": spec.family == "qwen3-vl",
        "rescale_factor": 1 / 255,
        "image_mean": list(image.image_mean),
        "image_std": list(image.image_std),
        "patch_size": spec.patch_size,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        "fps": 2.0,
        "min_frames": 2,
        "max_frames": 64,
        "resample": 3,
    }


def build_tiny_qwen(spec: TinyQwenSpec = TinyQwenSpec()):
    """(model, processor) for a tiny random Qwen-VL of `spec.family`, in memory, seed `spec.seed`. The processor
    is the family's stock processor class with no video part (see `twigvlm.adapters.qwen_processor`)."""
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )

    tokenizer = build_tokenizer(spec.vocab_size, SPECIAL_TOKENS, CHAT_TEMPLATE)
    vocab = max(spec.vocab_size, len(tokenizer))
    config = _config(spec, tokenizer, vocab)
    model_cls, processor_cls = {
        "qwen2-vl": (Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
        "qwen2.5-vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
        "qwen3-vl": (Qwen3VLForConditionalGeneration, Qwen3VLProcessor),
    }[spec.family]
    torch.manual_seed(spec.seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = without_video(processor_cls)(_image_processor(spec), tokenizer, chat_template=CHAT_TEMPLATE)
    return model, processor


def save_tiny_qwen(out_dir: str | Path, spec: TinyQwenSpec = TinyQwenSpec()) -> Path:
    """Build a tiny random Qwen-VL and save it as `save_pretrained` lays a real checkpoint out (model, tokenizer,
    image processor, chat template, and the video processor's config)."""
    out = Path(out_dir)
    model, processor = build_tiny_qwen(spec)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "video_preprocessor_config.json").write_text(json.dumps(video_processor_config(spec), indent=2) + "\n")
    return out
