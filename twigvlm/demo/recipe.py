"""The demo base's vision recipes: v1 (what shipped first) and v2 (LLaVA's geometry and redundancy).

A recipe fixes the vision tower's shape (picture size, patch size, width, depth) and how the vision stages train.
The shipped `vision.safetensors` records its recipe's name and geometry in its metadata, so `build_demo` builds the
tower the file was trained for; a file without that metadata is v1's.

- **v1**: a 6-layer SigLIP ViT at 192 px with 16-px patches (144 visual tokens); pre-trained on per-cell labels,
  then *grounded* (each visual token regressed onto the embedding of a word naming its own patch), then aligned
  with a LoRA on every decoder layer. Its tokens carry their own patch and little else, and its decoder still reads
  the picture in layers 24-26: little of the redundancy that visual-token pruning exploits.
- **v2**: LLaVA-1.5's geometry, 336 px with 14-px patches, so 576 visual tokens and R̄ = 64 is the paper's budget
  M/9 exactly; an 8-layer tower whose tokens must carry context (besides the per-cell read-outs, every token alone
  and the pooled tokens must predict the picture's objects, colours, shapes and places: `vision/pretrain.py`); no
  grounding stage; alignment with the visual tokens wiped from layer K_f = round(0.75·L) on in half of the steps
  (the decoder learns to finish reading the picture by then, as LLaVA's does) and kept in every layer in the others
  (the stock deep layers, which have no LoRA, must still answer with the picture's tokens among their keys, as the
  unpruned base does at inference), and the LoRA on layers below K_f only. Random visual-token
  dropout during alignment exists as a lever (`token_dropout`) and is off: a base trained with it is easier to prune
  than an off-the-shelf VLM, so any result that used it must say so next to its RelAcc.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import TwigVLMError

META_RECIPE = "recipe"  # the vision file's metadata keys
_GEOMETRY = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")


@dataclass(frozen=True)
class VisionRecipe:
    name: str
    image_size: int  # the tower's input (the demo world draws at 192 px; the processor resizes)
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    context_weight: float = 0.0  # pre-training: weight of the picture-level targets on every token and the pool
    patch_weight: float = 0.0  # pre-training: weight of each token's own patch's object classes (colour, shape, size)
    position_init: str = "random"  # a fresh tower's position embeddings: HF's random init, or "sincos" (2-D sin-cos)
    ground: bool = True  # run stage 1b (per-patch word grounding)
    wipe_layer: int | None = None  # alignment: decoder layers ≥ this one run without the visual tokens (None: all)
    wipe_share: float = 1.0  # alignment: the share of steps run with that wipe (the others read it in every layer)
    lora_below_wipe: bool = False  # alignment: the decoder LoRA only on layers < wipe_layer
    token_dropout: float = 0.0  # alignment: fraction of visual tokens dropped at random from layer `dropout_layer`
    dropout_layer: int = 2  # where TTP prunes (the twig's K)

    @property
    def grid(self) -> int:
        """Patches a side."""
        return self.image_size // self.patch_size

    @property
    def num_visual(self) -> int:
        return self.grid**2

    def vision_config(self) -> dict:
        """Keyword arguments of `SiglipVisionConfig`."""
        return dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            vision_use_head=False,
        )

    def metadata(self) -> dict[str, str]:
        """What the shipped vision file records (safetensors metadata is str → str)."""
        return {META_RECIPE: self.name, **{k: str(getattr(self, k)) for k in _GEOMETRY}}


V1 = VisionRecipe("v1", 192, 16, 256, 1024, 6, 4)
V2 = VisionRecipe(
    "v2",
    336,
    14,
    256,
    1024,
    8,
    4,
    context_weight=1.0,
    ground=False,
    wipe_layer=23,
    wipe_share=0.5,
    lora_below_wipe=True,
)
RECIPES = {r.name: r for r in (V1, V2)}


def recipe(name: str) -> VisionRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise TwigVLMError(f"unknown demo recipe {name!r}: use one of {', '.join(RECIPES)}") from None


def recipe_from_metadata(meta: dict[str, str] | None) -> VisionRecipe:
    """The recipe a vision file was trained with: its name and geometry from the metadata (v1 when it has none).
    A file whose geometry disagrees with its named recipe keeps its own geometry (a custom run)."""
    meta = meta or {}
    base = recipe(meta.get(META_RECIPE, "v1"))
    try:
        geometry = {k: int(meta[k]) for k in _GEOMETRY if k in meta}
    except ValueError:
        raise TwigVLMError(f"the demo vision file's geometry metadata is not numeric ({meta})") from None
    if geometry.get("image_size", base.image_size) % geometry.get("patch_size", base.patch_size):
        raise TwigVLMError(f"the demo vision file's image size is not a multiple of its patch size ({meta})")
    return dataclasses.replace(base, **geometry)
