"""Adapter for stock `VideoLlavaForConditionalGeneration` (transformers 5.x): the paper's video system.

Video-LLaVA has two CLIP towers with one shared projector: images go through the image tower (CLS dropped by the
"default" strategy, as in LLaVA), videos through the video tower, every frame on its own, keeping *all* of the
selected layer's tokens — CLS first, then the patches. A video is therefore frames × (1 + patches) `<video>`
placeholders, frame-major, each frame's CLS first. There are no extra position tricks: 1-D RoPE over the prompt.

The stock video processor needs torchvision; here video frames (already sampled by `twigvlm.video`) go through
the stock *image* processor — the same resize, crop, rescale and normalisation the video processor applies — and
are stacked into `pixel_values_videos` [V, F, 3, h, w] (`video_inputs`). VisionZip runs per image and per frame
(the frame's CLS row scores its tokens, CLS included); a prompt with both images and videos is refused for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..errors import TwigVLMError
from .base import Encoded, Layout, Reducer
from .capabilities import VideoLayout
from .llava import LlavaAdapter
from .stock import VisualFeatures


class VideoLlavaAdapter(VideoLayout, LlavaAdapter):
    """Images and videos, separate towers, one projector; every capability of LLaVA, VisionZip on either kind."""

    model_types = ("video_llava",)
    takes_video = True

    def vision_tower(self, kind: str = "image") -> nn.Module:
        return self.model.model.video_tower if kind == "video" else self.model.model.image_tower

    # ---- video inputs ---------------------------------------------------------------------------------------
    def frame_pixels(self, frames: Sequence[Image.Image]) -> torch.Tensor:
        """Frames → [F, 3, h, w] through the stock image processor (the video processor's own transforms)."""
        out = self.processor.image_processor(images=list(frames), return_tensors="pt")
        return out.get("pixel_values", out.get("pixel_values_images"))

    # ---- VisionZip --------------------------------------------------------------------------------------------
    def reduced_batch(self, batch: Any, reducer: Reducer) -> Encoded:
        videos = batch.get("pixel_values_videos")
        if videos is None:
            return super().reduced_batch(batch, reducer)
        if batch.get("pixel_values") is not None:
            raise TwigVLMError("VisionZip on Video-LLaVA reduces images or videos, not both in one prompt")
        frames = videos.flatten(0, 1)  # [V·F, 3, h, w]: every frame reduced as an image
        features, input_ids, reduction, counts = self.reduce_visual(
            frames, batch["input_ids"], reducer, token_id=self.video_token_id
        )
        per_video = videos.shape[1]
        kept = [sum(counts[v * per_video : (v + 1) * per_video]) for v in range(videos.shape[0])]
        encoded = self.embed_visual(input_ids, [VisualFeatures(self.video_token_id, features, kept)])
        encoded.reduction = reduction
        return encoded

    # ---- pictures -------------------------------------------------------------------------------------------
    def video_layout(self, videos: Sequence[Any]) -> list[Layout]:
        """One panel per frame, its CLS token first (no patch to draw), then its patch grid."""
        patch = self.model.config.vision_config.patch_size
        extra = getattr(self.processor, "num_additional_image_tokens", 1)
        return [
            (img, img.height // patch, img.width // patch, extra)
            for v in videos
            for img in self.unnormalised(self.frame_pixels(v.frames))
        ]

    # ---- training: a dict of the images' and the videos' pixel values (either may be missing) ----------------
    def vision_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in ("pixel_values", "pixel_values_videos") if batch.get(k) is not None}

    def first_images(self, pixels: Any, n: int) -> Any:
        if pixels is None:
            return None
        kept = {k: v for k, v in pixels.items() if k != "pixel_values"}  # videos are never cut (see data.py)
        if n and "pixel_values" in pixels:
            kept["pixel_values"] = pixels["pixel_values"][:n]
        return kept or None
