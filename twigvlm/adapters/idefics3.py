"""Adapter for stock `Idefics3ForConditionalGeneration` and `SmolVLMForConditionalGeneration` (transformers 5.x).

An image is split into a grid of tiles plus a global (downscaled whole) image; each goes through the SigLIP
tower, and the connector's pixel shuffle folds s×s patches into one token (`image_seq_len` tokens per tile). The
prompt spells the layout out in text: `<fake_token_around_image><row_i_col_j><image>×S` per tile, a newline per
tile row, then `<fake_token_around_image><global-img><image>×S<fake_token_around_image>`. Only the `<image>` ids
are visual tokens (the fake, row/column and global tokens are text, always kept); M counts every tile's tokens
and the global image's, so a `--keep-ratio` budget is a share of all of them.

Videos are refused (SmolVLM's video path needs its torchvision video processor and frame-timestamp prompts);
VisionZip is refused (the pixel shuffle merges tower tokens before the projection, and SigLIP has no CLS).
SmolVLM's stock processor needs the `num2words` package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..errors import TwigVLMError
from .base import Layout
from .llava import LlavaStyleAdapter
from .stock import VisualFeatures

GLOBAL_TAG = "<global-img>"


class Idefics3Adapter(LlavaStyleAdapter):
    """Idefics3 / SmolVLM: tiles + a global image, pixel shuffle; `<image>` ids are the only visual tokens."""

    model_types = ("idefics3", "smolvlm")

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        self.seq_len = int(processor.image_seq_len)
        self.global_token_id = self.tokenizer.convert_tokens_to_ids(GLOBAL_TAG)
        if self.global_token_id is None or self.global_token_id == self.tokenizer.unk_token_id:
            raise TwigVLMError(f"the tokenizer has no {GLOBAL_TAG} token: save the model with its own tokenizer")

    def image_counts(self, input_ids: torch.Tensor) -> list[int]:
        """Tokens of each image (its tiles and its global image), read from the ids: an image ends with the
        `image_seq_len` image tokens that follow its `<global-img>` tag."""
        counts: list[int] = []
        for row in input_ids:
            is_image = (row == self.image_token_id).long()
            done = 0
            for g in (row == self.global_token_id).nonzero().flatten().tolist():
                end = int(is_image[: g + 1 + self.seq_len].sum())
                counts.append(end - done)
                done = end
        return counts

    def image_groups(self, batch: Any) -> list[VisualFeatures]:
        pixels = batch.get("pixel_values")
        if pixels is None or pixels.numel() == 0:
            return []
        mask = batch.get("pixel_attention_mask")
        if pixels.dim() == 4:  # training's flattened tiles [N, 3, h, w]: one row of images
            pixels, mask = pixels.unsqueeze(0), None if mask is None else mask.unsqueeze(0)
        out = self.model.model.get_image_features(
            pixel_values=pixels.to(self.device, self.dtype), pixel_attention_mask=mask, return_dict=True
        )
        features = torch.cat(list(out.pooler_output))  # [Σ tiles · S, H]
        return [VisualFeatures(self.image_token_id, features, self.image_counts(batch["input_ids"]))]

    # ---- training: tiles flattened to [N, 3, h, w] with their pixel masks (they concatenate across examples)
    # and each image's tile count ("tiles", which the stock model does not take)
    def vision_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        pixels = batch["pixel_values"].flatten(0, 1)  # [B·N, 3, h, w], padding images all zero
        real = pixels.flatten(1).ne(0).any(-1)
        out = {"pixel_values": pixels[real]}
        if batch.get("pixel_attention_mask") is not None:
            out["pixel_attention_mask"] = batch["pixel_attention_mask"].flatten(0, 1)[real]
        out["tiles"] = torch.tensor([c // self.seq_len for c in self.image_counts(batch["input_ids"])])
        return out

    def image_token_counts(self, ids: Sequence[int], pixels: Any, num_images: int) -> list[int]:
        return self.image_counts(torch.tensor([list(ids)]))

    def first_images(self, pixels: Any, n: int) -> Any:
        if pixels is None or not n:
            return None
        tiles = int(pixels["tiles"][:n].sum())
        return {k: v[:n] if k == "tiles" else v[:tiles] for k, v in pixels.items()}

    # ---- pictures -------------------------------------------------------------------------------------------
    def visual_layout(self, images: Sequence[Image.Image]) -> list[Layout]:
        """One panel per tile (row by row), then the global image; each a grid of side √S."""
        if not images:
            return []
        ip = self.processor.image_processor
        side = int(round(self.seq_len**0.5))
        layouts: list[Layout] = []
        for img in images:
            out = ip(images=[[img]], return_tensors="pt", return_row_col_info=True)
            tiles = max(1, out["rows"][0][0] * out["cols"][0][0]) + (1 if out["rows"][0][0] else 0)
            for tile in self.unnormalised(out["pixel_values"][0, :tiles]):
                layouts.append((tile, side, side, 0))
        return layouts

    @property
    def projector(self) -> nn.Module:
        return self.model.model.connector  # pixel shuffle + linear
