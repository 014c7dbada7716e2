"""Tiny random LLaVA models built offline from configs: for the tests and for `twigvlm demo` until the
embedded demo model exists.

Everything is made here, with no download: a byte-level BPE tokenizer trained on a few sentences, a ChatML
chat template, a CLIP or SigLIP image processor, and a stock `LlavaForConditionalGeneration` whose text
backbone is Llama (grouped-query attention), Mistral or Qwen2. `build_tiny_llava` saves it all with
`save_pretrained`, so it loads back through the same public path as a real checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "A red circle sits above a small blue square on a gray background.",
    "What color is the triangle? The triangle is green.",
    "Describe the image in detail. There are three shapes: a large yellow star, a purple rectangle and a dot.",
    "How many objects are there? There are two objects, left and right of the center.",
    "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ — 数字 123 456 7890!",
    "user assistant system image picture photo answer question yes no left right top bottom",
]


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny random LLaVA. backbone: llama | mistral | qwen2; tower: clip | siglip."""

    backbone: str = "llama"
    tower: str = "clip"
    num_layers: int = 6
    hidden_size: int = 64
    intermediate_size: int | None = None  # MLP width; None → 2 × hidden_size
    num_heads: int = 4
    num_kv_heads: int = 2
    image_size: int = 32
    patch_size: int = 8
    vocab_size: int = 512
    tie_embeddings: bool = True
    init_std: float = 0.1
    seed: int = 0

    @property
    def select_strategy(self) -> str:
        return "default" if self.tower == "clip" else "full"  # CLIP has a CLS token to drop; SigLIP has none


def build_tokenizer(vocab_size: int = 512, special_tokens: list[str] | None = None, chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer with the chat and image special tokens (LLaVA's by default), trained on a
    built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens or SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=chat_template,
    )


def text_config(spec: TinySpec, vocab: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size or 2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=spec.tie_embeddings,
        initializer_range=spec.init_std,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    configs = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if spec.backbone not in configs:
        raise ValueError(f"unknown tiny backbone {spec.backbone!r}: use one of {', '.join(configs)}")
    extra = {"sliding_window": None} if spec.backbone in ("mistral", "qwen2") else {}
    return configs[spec.backbone](**common, **extra)


def _vision(spec: TinySpec):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, SiglipImageProcessorPil, SiglipVisionConfig

    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    size = {"height": spec.image_size, "width": spec.image_size}
    if spec.tower == "clip":
        proc = CLIPImageProcessorPil(size={"shortest_edge": spec.image_size}, crop_size=size)
        return CLIPVisionConfig(**common), proc, 1
    if spec.tower == "siglip":
        return SiglipVisionConfig(**common), SiglipImageProcessorPil(size=size), 0
    raise ValueError(f"unknown tiny tower {spec.tower!r}: use clip or siglip")


def build_tiny_llava(spec: TinySpec = TinySpec()):
    """(model, processor) for a tiny random LLaVA, built in memory from configs with seed `spec.seed`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = build_tokenizer(spec.vocab_size)
    vocab = max(spec.vocab_size, len(tokenizer))
    vision_config, image_processor, num_extra = _vision(spec)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config(spec, vocab),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_select_strategy=spec.select_strategy,
        vision_feature_layer=-1,
        tie_word_embeddings=spec.tie_embeddings,
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.select_strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=num_extra,
    )
    return model, processor


def save_tiny_llava(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Build a tiny random LLaVA and save model + processor to `out_dir` (a normal HF model directory)."""
    return save_model_dir(out_dir, *build_tiny_llava(spec))


def save_model_dir(out_dir: str | Path, model, processor) -> Path:
    """Save a model and its processor into one directory, as `save_pretrained` lays a checkpoint out."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def demo_image(path: str | Path, size: int = 96, seed: int = 0) -> Path:
    """Write a small PNG of a few colored shapes (an input for demos and tests)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    colors = [(220, 40, 40), (40, 90, 220), (40, 170, 60), (240, 200, 30)]
    for color in colors:
        x, y, r = rng.randrange(10, size - 10), rng.randrange(10, size - 10), rng.randrange(6, size // 5)
        box = (x - r, y - r, x + r, y + r)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    path = Path(path)
    img.save(path)
    return path
