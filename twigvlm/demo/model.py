"""Assembly of the demo VLM: a stock `LlavaForConditionalGeneration` from the SmolLM2 decoder and our vision parts.

The vision tower is a small SigLIP ViT and the projector LLaVA's two-layer MLP; both are trained by
`twigvlm.demo.train_vision` and shipped in `assets/vision.safetensors` (half precision), whose metadata names the
recipe and geometry it was trained with (`twigvlm.demo.recipe`: v1, 192 px with 16-px patches → 144 visual tokens;
v2, 336 px with 14-px patches → 576, LLaVA-1.5's). The image placeholder is an existing special token of SmolLM2's
vocabulary that the model never writes (`<empty_output>`), so the decoder's embedding and head stay exactly the
packaged ones. The chat template is SmolLM2's ChatML without its default system prompt, with image items.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import TwigVLMError
from ..inputs.named import NamedModel
from .decoder import gguf_path, load_decoder
from .lora import merge_lora
from .recipe import V1, VisionRecipe, recipe_from_metadata

# The shipped parts; $TWIGVLM_DEMO_ASSETS names another folder of them (a rebuilt base, e.g. `train_vision --out`),
# read when this module is imported.
ASSETS_ENV = "TWIGVLM_DEMO_ASSETS"
ASSETS = Path(os.environ.get(ASSETS_ENV) or Path(__file__).parent / "assets").expanduser()
VISION_WEIGHTS = "vision.safetensors"
LORA_WEIGHTS = "decoder_lora.safetensors"  # optional: low-rank decoder adapters, merged into the weights at load
IMAGE_TOKEN = "<empty_output>"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}" + IMAGE_TOKEN + "\n{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def vision_prefixes() -> tuple[str, ...]:
    """State-dict prefixes of the parts we train and ship (everything else is the packaged decoder)."""
    return ("model.vision_tower.", "model.multi_modal_projector.")


def build_demo(
    vision_state: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
    use_assets: bool = True,
    recipe: VisionRecipe | None = None,
) -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration, LlavaProcessor) in fp32: the packaged decoder, and the vision tower and
    projector from `vision_state` (else from the shipped assets when use_assets, else freshly initialised with
    `seed`). The tower's geometry is `recipe`'s, else the shipped file's (v1's where there is none)."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )
    from transformers.initialization import no_init_weights

    shipped = use_assets and vision_state is None and (ASSETS / VISION_WEIGHTS).is_file()
    if recipe is None:
        recipe = shipped_recipe() if shipped else V1
    decoder, tokenizer = load_decoder(torch.float32, progress)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**recipe.vision_config()),
        text_config=decoder.config,
        image_token_id=image_token_id,
        image_seq_length=recipe.num_visual,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    # Every parameter is overwritten below when the vision weights are known (the decoder's, the tied head, the
    # tower's and projector's): building without initialising them saves seconds and changes nothing.
    with no_init_weights() if shipped or vision_state is not None else contextlib.nullcontext():
        model = LlavaForConditionalGeneration(config)
    if not shipped and vision_state is None and recipe.position_init == "sincos":
        embedding = model.model.vision_tower.embeddings.position_embedding
        with torch.no_grad():
            embedding.weight.copy_(sincos_positions(recipe.grid, recipe.hidden_size))
    model.model.language_model.load_state_dict(decoder.model.state_dict())
    model.tie_weights()
    if shipped:
        vision_state = read_vision_weights(ASSETS / VISION_WEIGHTS)
        if (ASSETS / LORA_WEIGHTS).is_file():
            lora, scale = read_lora_weights(ASSETS / LORA_WEIGHTS)
            merge_lora(model, lora, scale)
    if vision_state is not None:
        missing = [k for k in model.state_dict() if k.startswith(vision_prefixes()) and k not in vision_state]
        if missing:
            raise TwigVLMError(
                f"the demo vision weights lack {missing[0]}: rebuild them with `python -m twigvlm.demo.train_vision`"
            )
        model.load_state_dict({k: v.float() for k, v in vision_state.items()}, strict=False)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config._attn_implementation = "sdpa"
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": recipe.image_size, "width": recipe.image_size}),
        tokenizer=tokenizer,
        patch_size=recipe.patch_size,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )
    return model.eval(), processor


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """2-D sin-cos position embeddings [grid², width], rows major (as a ViT's patches): half the channels encode
    the patch's row, half its column, each as sines and cosines of geometrically spaced frequencies (MAE's
    initialisation). A tower trained from scratch then starts knowing which patches are neighbours."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [W/4]
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.flatten().double()[:, None] * omega[None]  # [grid², W/4]
        return torch.cat([angle.sin(), angle.cos()], 1)

    return torch.cat([encode(rows), encode(cols)], 1).float()  # [grid², W]


def vision_state(model: Any, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The trained (shipped) tensors of a demo model, in `dtype`."""
    return {
        k: v.detach().to("cpu", dtype).contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(vision_prefixes())
    }


def read_vision_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise TwigVLMError(f"the demo weights {path} are unreadable ({e}): reinstall twigvlm") from None


def shipped_recipe() -> VisionRecipe:
    """The recipe of the vision file in the assets folder (the package's, or $TWIGVLM_DEMO_ASSETS): what a rebuild
    builds by default; v1 where there is no file."""
    path = ASSETS / VISION_WEIGHTS
    return recipe_from_metadata(read_metadata(path)) if path.is_file() else V1


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata ({} where it has none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise TwigVLMError(f"the demo weights {path} are unreadable ({e}): reinstall twigvlm") from None


def read_lora_weights(path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """The shipped decoder LoRA tensors and their scale (alpha / rank, from the file's metadata)."""
    state, meta = read_vision_weights(path), read_metadata(path)
    try:
        return state, float(meta["lora_alpha"]) / int(meta["lora_rank"])
    except (KeyError, ValueError, ZeroDivisionError):
        raise TwigVLMError(
            f"the demo LoRA weights {path} lack their lora_rank/lora_alpha metadata: reinstall twigvlm"
        ) from None


TWIG_DIR = ASSETS / "twig"
BUILD_HINT = "build them with `python -m twigvlm.demo.build` (see docs/demo-model.md)"


def vision_ready() -> bool:
    return (ASSETS / VISION_WEIGHTS).is_file()


def twig_ready() -> bool:
    return (TWIG_DIR / "twig.json").is_file()


def demo_adapter(dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """The demo VLM wrapped by its adapter (what `--model demo` loads)."""
    from ..adapters import adapter_for

    if not vision_ready():
        raise TwigVLMError(
            f"the demo model's trained vision weights ({ASSETS / VISION_WEIGHTS}) are not in this "
            f"installation: {BUILD_HINT}"
        )
    model, processor = build_demo()
    return adapter_for(model.to(device=device, dtype=dtype), processor)


def demo_twig_dir() -> Path:
    """The shipped twig (what `--twig demo` loads)."""
    if not twig_ready():
        raise TwigVLMError(f"the demo twig ({TWIG_DIR}) is not in this installation: {BUILD_HINT}")
    return TWIG_DIR


# `--model demo` / `--twig demo`: registered under this name in pyproject.toml's `twigvlm.named_models` entry points.
NAMED = NamedModel(load=demo_adapter, twig_dir=demo_twig_dir, decoder_gguf=gguf_path)
