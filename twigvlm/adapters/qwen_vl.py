"""Adapter for stock `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration` and
`Qwen3VLForConditionalGeneration` (transformers 5.x).

What differs from LLaVA, and where it is handled here:
- 3-D M-RoPE: the prompt's positions come from the model's own `get_rope_index` on the full, unpruned prompt
  (with `mm_token_type_ids`, and Qwen2.5-VL's seconds per temporal patch for videos); text after the prompt
  takes `max + 1 + n` on all three axes (the core's `text_positions`). The model's stateful `rope_deltas` is
  never read. The decoder layers get (cos, sin) from the text model's own rotary embedding and no position ids.
- Dynamic resolution: each image (and each video) has its own token grid (`image_grid_thw`), so M varies.
- Qwen3-VL's deepstack: the vision tower's extra features become `Encoded.layer_adds`, which the engine adds
  after the first base layers during the prefill (gathered with the kept tokens when pruning comes first).
- Video: frames from `twigvlm.video` through `qwen_video.py` (no torchvision needed).
What it shares with the LLaVA family (the chat template, placeholder checks, `encode`, the scatter of the
features into their placeholders) is `StockAdapter`'s (`stock.py`).
VisionZip does not apply: the tower has no CLS token, merges 2×2 patches after its last layer and attends in
windows (2.5), so there is no per-token attention score of the kind VisionZip ranks by.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..errors import TwigVLMError
from .base import Encoded, Images, Layout, Videos
from .capabilities import PixelRange, VideoLayout
from .qwen_video import prepare_video
from .stock import StockAdapter, VisualFeatures, expand_placeholders


class QwenVLAdapter(VideoLayout, PixelRange, StockAdapter):
    """The Qwen-VL family: M-RoPE positions, per-image grids, video, and (Qwen3-VL) deepstack."""

    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    position_rows = 3
    takes_video = True
    placeholder_texts = ("<|image_pad|>", "<|video_pad|>")
    mismatch_hint = "the processor's patch or merge size does not match the model config"

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        self._inner = model.model  # Qwen2VLModel / Qwen2_5_VLModel / Qwen3VLModel
        self.merge = int(model.config.vision_config.spatial_merge_size)

    @property
    def attention_window(self) -> int | None:
        text = self.model.config.get_text_config()
        return int(text.sliding_window) if getattr(text, "use_sliding_window", False) else None

    # ---- prompts --------------------------------------------------------------------------------------------
    def render_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if not getattr(self.processor, "chat_template", None):
            raise TwigVLMError("this Qwen-VL processor has no chat template: save the model with its template")
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def chat_inputs(self, text: str, images: Images, videos: Videos, add_special_tokens: bool) -> Any:
        """The stock processor's outputs for images and text; with videos, the same fields built by
        `qwen_video.py` (the stock video processor needs torchvision)."""
        try:
            if videos:
                return self._process_with_videos(text, images, videos)
            return super().chat_inputs(text, images, videos, add_special_tokens)
        except TwigVLMError:
            raise
        except ValueError as e:  # the stock resize refuses extreme shapes (aspect ratio over 200)
            sizes = ", ".join(f"{im.width}×{im.height}" for im in images) or "the video frames"
            raise TwigVLMError(f"the image processor cannot take {sizes}: {str(e).splitlines()[0]}") from None

    def set_pixel_range(self, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """Resize images (and video frames) to between min_pixels and max_pixels, as the stock processor's own
        `min_pixels`/`max_pixels` do; None keeps the saved value."""
        ip = self.processor.image_processor
        size = dict(ip.size)
        low = size["shortest_edge"] if min_pixels is None else int(min_pixels)
        high = size["longest_edge"] if max_pixels is None else int(max_pixels)
        step = (ip.patch_size * ip.merge_size) ** 2
        if low < step or high < low:
            raise TwigVLMError(
                f"pixel range {low}..{high} is invalid: give {step} <= min_pixels <= max_pixels "
                f"(one merged patch is {ip.patch_size * ip.merge_size}×{ip.patch_size * ip.merge_size} pixels)"
            )
        size.update(shortest_edge=low, longest_edge=high)
        ip.size = type(ip.size)(**size) if not isinstance(ip.size, dict) else size

    def _process_with_videos(self, text: str, images: Images, videos: Videos) -> Any:
        from transformers import BatchFeature

        data: dict[str, torch.Tensor] = {}
        if images:
            out = self.processor.image_processor(images=list(images), return_tensors="pt")
            data["pixel_values"], data["image_grid_thw"] = out["pixel_values"], out["image_grid_thw"]
            counts = self.grid_counts(out["image_grid_thw"])
            text = expand_placeholders(text, self.image_token, [self.image_token * n for n in counts])
        stamps = self.model.config.model_type == "qwen3_vl"
        prepared = [
            prepare_video(self.processor.image_processor, v.frames, v.timestamps, self.video_token, stamps)
            for v in videos
        ]
        text = expand_placeholders(text, self.video_token, [p.placeholder for p in prepared])
        data["pixel_values_videos"] = torch.cat([p.pixel_values for p in prepared])
        data["video_grid_thw"] = torch.tensor([p.grid_thw for p in prepared])
        if self.model.config.model_type == "qwen2_5_vl":
            data["second_per_grid_ts"] = torch.tensor([p.seconds_per_grid for p in prepared])
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
        data["input_ids"] = ids
        data["attention_mask"] = torch.ones_like(ids)
        data["mm_token_type_ids"] = self.token_types(ids)
        return BatchFeature(data).to(self.device)

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """mm_token_type_ids [B, T]: 0 text, 1 image, 2 video (as the stock processor writes them)."""
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == self.image_token_id] = 1
        types[input_ids == self.video_token_id] = 2
        return types

    def grid_counts(self, grid_thw: torch.Tensor) -> list[int]:
        """Tokens of each image or video of grids [N, 3] (t, h, w): t·h·w patches, merged merge×merge."""
        return (grid_thw.prod(-1) // self.merge**2).tolist()

    # ---- encoding -------------------------------------------------------------------------------------------
    def visual_features(self, batch: Any) -> list[VisualFeatures]:
        """Images' and videos' features from the stock `get_image_features`/`get_video_features`, with their
        deepstack levels (Qwen3-VL: one [n, H] per level, added after base layer i)."""
        kinds = (
            (self.image_token_id, self._inner.get_image_features, "pixel_values", "image_grid_thw"),
            (self.video_token_id, self._inner.get_video_features, "pixel_values_videos", "video_grid_thw"),
        )
        groups = []
        for token_id, fn, pixels_key, grid_key in kinds:
            pixels, grid = batch.get(pixels_key), batch.get(grid_key)
            if pixels is None or grid is None or grid.numel() == 0:
                continue
            out = fn(pixels.to(self.device, self.dtype), grid, return_dict=True)
            levels = [torch.cat(list(level)) for level in getattr(out, "deepstack_features", None) or []]
            groups.append(VisualFeatures(token_id, torch.cat(list(out.pooler_output)), self.grid_counts(grid), levels))
        return groups

    def prompt_positions(self, input_ids: torch.Tensor, grids: Any = None) -> torch.Tensor:
        """[3, B, T] M-RoPE positions from the stock `get_rope_index` (0..T−1 on every axis for text only)."""
        grids = grids or {}
        image_grid, video_grid = grids.get("image_grid_thw"), grids.get("video_grid_thw")
        if image_grid is None and video_grid is None:
            b, n = input_ids.shape
            return torch.arange(n, device=input_ids.device).view(1, 1, n).expand(3, b, n)
        extra = {}
        if self.model.config.model_type == "qwen2_5_vl" and grids.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = grids["second_per_grid_ts"]
        positions, _ = self._inner.get_rope_index(
            input_ids,
            mm_token_type_ids=self.token_types(input_ids),
            image_grid_thw=image_grid,
            video_grid_thw=video_grid,
            attention_mask=grids.get("attention_mask"),
            **extra,
        )
        return positions  # [3, B, T]

    # ---- training -------------------------------------------------------------------------------------------
    VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")

    def vision_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in self.VISION_KEYS if batch.get(k) is not None}

    def image_token_counts(self, ids: Sequence[int], pixels: Any, num_images: int) -> list[int]:
        if pixels is None or "image_grid_thw" not in pixels:
            return []
        return self.grid_counts(pixels["image_grid_thw"])

    def first_images(self, pixels: Any, n: int) -> Any:
        """The first n images' inputs, and every video's (a record with videos is never cut)."""
        if pixels is None:
            return None
        kept = {k: v for k, v in pixels.items() if k not in ("pixel_values", "image_grid_thw")}
        if n and "image_grid_thw" in pixels:
            grid = pixels["image_grid_thw"][:n]
            kept.update(pixel_values=pixels["pixel_values"][: int(grid.prod(-1).sum())], image_grid_thw=grid)
        return kept or None

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: Any = None) -> Encoded:
        if pixel_values is not None and not isinstance(pixel_values, dict):
            raise TwigVLMError("Qwen-VL training batches carry pixel values with their grids (a dict)")
        return super().embed_inputs(input_ids, pixel_values)

    # ---- pictures -------------------------------------------------------------------------------------------
    def visual_layout(self, images: Images) -> list[Layout]:
        """Each image at the size the processor resizes it to, with its merged-token grid (no leading tokens)."""
        from .qwen_video import frame_size

        ip = self.processor.image_processor
        layouts = []
        for img in images:
            h, w = frame_size(ip, img)
            step = ip.patch_size * self.merge
            layouts.append((img.convert("RGB").resize((w, h), Image.BICUBIC), h // step, w // step, 0))
        return layouts

    def video_layout(self, videos: Videos) -> list[Layout]:
        """One panel per temporal patch of each video (its first frame), with the merged-token grid."""
        tp = self.processor.image_processor.temporal_patch_size
        layouts = []
        for video in videos:
            frames = list(video.frames)
            frames += frames[-1:] * (-len(frames) % tp)
            layouts += self.visual_layout(frames[::tp])
        return layouts

    # ---- the decoder (layers, rotary, norm, head: TextModelParts) --------------------------------------------
    def vision_fingerprint(self) -> dict[str, torch.Tensor]:
        return {"merger": next(self._inner.visual.merger.parameters())}
