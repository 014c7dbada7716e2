"""Tiny random Video-LLaVA, LLaVA-NeXT(-Video), LLaVA-OneVision and Idefics3 models built offline, with working
processors (and, for the tests only, a SmolVLM model behind an Idefics3 processor: family "smolvlm").

Each is the stock `*ForConditionalGeneration` class from a small config (a Llama decoder of a few layers, a
two-layer CLIP or SigLIP tower), a byte-level BPE tokenizer with the family's special tokens, a ChatML template
that writes the family's placeholders, and the family's stock PIL image processor at a small size.
`save_tiny_family` writes the directory `save_pretrained` would write, so it loads back as a real checkpoint does
(without torchvision: the processors that carry a video part are built without it, `adapters/qwen_processor.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters.qwen_processor import without_video
from .llava import TinySpec, build_tokenizer, save_model_dir, text_config

CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BASE_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]


@dataclass(frozen=True)
class TinyFamilySpec:
    """Shape of a tiny random model of `family`: a Llama decoder, a two-layer vision tower of `image_size` pixels
    cut into `patch_size` patches (32 / 8 → 4×4 tokens per tile or frame)."""

    family: str = "video-llava"
    num_layers: int = 6
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    image_size: int = 32
    patch_size: int = 8
    vocab_size: int = 600
    tie_embeddings: bool = False
    init_std: float = 0.1
    seed: int = 0


def _text(spec: TinyFamilySpec, vocab: int) -> Any:
    """The Llama decoder (grouped-query attention) of `tiny/llava.py`'s LLaVA, at this spec's shape."""
    shape = TinySpec(
        backbone="llama",
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        tie_embeddings=spec.tie_embeddings,
        init_std=spec.init_std,
    )
    return text_config(shape, vocab)


def _clip(spec: TinyFamilySpec) -> dict[str, Any]:
    return dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        initializer_range=spec.init_std,
    )


def _video_llava(spec: TinyFamilySpec, tok: Any, vocab: int) -> tuple[Any, Any]:
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaProcessor
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    grid = (spec.image_size // spec.patch_size) ** 2
    config = VideoLlavaConfig(
        vision_config=_clip(spec),
        text_config=_text(spec, vocab),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        image_seq_length=grid,
        video_seq_length=8 * (grid + 1),
        tie_word_embeddings=spec.tie_embeddings,
    )
    size = {"height": spec.image_size, "width": spec.image_size}
    image_processor = VideoLlavaImageProcessor(size={"shortest_edge": spec.image_size}, crop_size=size)
    processor = without_video(VideoLlavaProcessor)(image_processor, tok, chat_template=CHAT, patch_size=spec.patch_size)
    torch.manual_seed(spec.seed)
    return VideoLlavaForConditionalGeneration(config), processor


def _siglip(spec: TinyFamilySpec) -> dict[str, Any]:
    return {**_clip(spec), "model_type": "siglip_vision_model"}


# Anyres resolutions: a 32-pixel tile in a 1×2, 2×1 or 2×2 grid.
def _pinpoints(spec: TinyFamilySpec) -> list[list[int]]:
    s = spec.image_size
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


def _llava_next(spec: TinyFamilySpec, tok: Any, vocab: int) -> tuple[Any, Any]:
    """LLaVA-NeXT, or (family "llava-next-video") LLaVA-NeXT-Video: the same images, and videos pooled 2×2."""
    import transformers
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    video = spec.family == "llava-next-video"
    name = "LlavaNextVideo" if video else "LlavaNext"
    ids = {"image_token_index": tok.convert_tokens_to_ids("<image>")}
    if video:
        ids["video_token_index"] = tok.convert_tokens_to_ids("<video>")
    config = getattr(transformers, f"{name}Config")(
        vision_config=_clip(spec),
        text_config=_text(spec, vocab),
        image_grid_pinpoints=_pinpoints(spec),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=spec.tie_embeddings,
        **ids,
    )
    size = {"height": spec.image_size, "width": spec.image_size}
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size=size, image_grid_pinpoints=_pinpoints(spec)
    )
    processor_cls = getattr(transformers, f"{name}Processor")
    processor = (without_video(processor_cls) if video else processor_cls)(
        image_processor,
        tok,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT,
        num_additional_image_tokens=1,
    )
    torch.manual_seed(spec.seed)
    return getattr(transformers, f"{name}ForConditionalGeneration")(config), processor


def _llava_onevision(spec: TinyFamilySpec, tok: Any, vocab: int) -> tuple[Any, Any]:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    # anyres_max_2: a 2×2 grid (64 tokens) exceeds 2 tiles' worth by a ratio > 1.1, so the model shrinks it
    config = LlavaOnevisionConfig(
        vision_config=_siglip(spec),
        text_config=_text(spec, vocab),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=_pinpoints(spec),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_2",
        tie_word_embeddings=spec.tie_embeddings,
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size},
        image_grid_pinpoints=_pinpoints(spec),
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = without_video(LlavaOnevisionProcessor)(
        image_processor,
        tok,
        chat_template=CHAT,
        num_image_tokens=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_2",
    )
    torch.manual_seed(spec.seed)
    return LlavaOnevisionForConditionalGeneration(config), processor


def _idefics3(spec: TinyFamilySpec, tok: Any, vocab: int) -> tuple[Any, Any]:
    """Idefics3, or (family "smolvlm", tests only) a SmolVLM model behind an Idefics3 processor: the two write
    images the same way, and SmolVLM's own processor needs the `num2words` package."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    smol = spec.family == "smolvlm"
    # Tiles of image_size pixels (4×4 patches → 2×2 tokens after the pixel shuffle), up to 2×2 tiles + global.
    config = (SmolVLMConfig if smol else Idefics3Config)(
        vision_config={**_siglip(spec), "model_type": "smolvlm_vision" if smol else "idefics3_vision"},
        text_config=_text(spec, vocab),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        initializer_range=spec.init_std,
        tie_word_embeddings=spec.tie_embeddings,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * spec.image_size},
        max_image_size={"longest_edge": spec.image_size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    seq_len = (spec.image_size // spec.patch_size) ** 2 // 4
    processor = Idefics3Processor(image_processor, tok, image_seq_len=seq_len, chat_template=CHAT)
    torch.manual_seed(spec.seed)
    return (SmolVLMForConditionalGeneration if smol else Idefics3ForConditionalGeneration)(config), processor


# The Idefics3 prompt's own tokens: the fake token around images, the global tag and the tile positions.
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]

BUILDERS = {
    "idefics3": _idefics3,
    "smolvlm": _idefics3,
    "video-llava": _video_llava,
    "llava-next": _llava_next,
    "llava-next-video": _llava_next,
    "llava-onevision": _llava_onevision,
}


def build_tiny_family(spec: TinyFamilySpec = TinyFamilySpec()) -> tuple[Any, Any]:
    """(model, processor) for a tiny random model of `spec.family`, in memory, seed `spec.seed`."""
    if spec.family not in BUILDERS:
        raise ValueError(f"unknown tiny family {spec.family!r}: use one of {', '.join(BUILDERS)}")
    extra = IDEFICS3_TOKENS if spec.family in ("idefics3", "smolvlm") else []
    tok = build_tokenizer(spec.vocab_size, BASE_TOKENS + extra, CHAT)
    model, processor = BUILDERS[spec.family](spec, tok, max(spec.vocab_size, len(tok)))
    model = model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor


def save_tiny_family(out_dir: str | Path, spec: TinyFamilySpec = TinyFamilySpec()) -> Path:
    """Build a tiny random model of `spec.family` and save it as `save_pretrained` lays a checkpoint out."""
    return save_model_dir(out_dir, *build_tiny_family(spec))
