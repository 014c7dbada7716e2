"""Adapters for stock `LlavaNextForConditionalGeneration` and `LlavaOnevisionForConditionalGeneration`
(transformers 5.x): anyres tiles, unpadding and the learned `image_newline`.

An image becomes a base tile (the whole image at the tower's size, g×g tokens) followed by the tiles of its best
anyres resolution, stitched into one grid, cut back to the image's aspect ratio ("unpadding"; OneVision also
shrinks a grid larger than `anyres_max_N` tiles bilinearly), with the learned `image_newline` vector appended to
every row: base g² tokens, then rows × (cols + 1). OneVision's multi-image prompts keep only each image's base
tile plus one newline; its videos are frames at the base size, each pooled 2×2 bilinearly by the model, plus one
newline at the end of the video. All of these come from the model's own `get_image_features` /
`get_video_features`; the adapter only counts them.

**Newline tokens are visual tokens.** The stock model writes them into `<image>`/`<video>` placeholder slots, so
they are in the visual mask, count in M (and so in the `--keep-ratio` budget) and may be pruned like any patch —
the twig scores them with everything else. Treating them as text would need positions the processor does not
mark; treating them as visual keeps "visual = placeholder slot" true for every family.

VisionZip does not apply: the projected, unpadded, newline-interleaved grid has no one-to-one tower token with
an attention score (and OneVision's tower, SigLIP, has no CLS). Video frames (OneVision) go through the stock
image processor: each frame's base tile is the video processor's resize to the same size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .base import Layout
from .capabilities import VideoLayout
from .llava import LlavaStyleAdapter
from .stock import VisualFeatures

GRAY = (128, 128, 128)  # how a newline token's cell is drawn in the kept-token picture


class LlavaNextAdapter(LlavaStyleAdapter):
    """LLaVA-NeXT: anyres tiles, unpadded, one learned newline per grid row; images only."""

    model_types = ("llava_next",)

    def image_kwargs(self, batch: Any) -> dict[str, Any]:
        """What `get_image_features` takes besides the pixels and sizes (OneVision: images per prompt)."""
        return {}

    def image_groups(self, batch: Any) -> list[VisualFeatures]:
        pixels = batch.get("pixel_values")
        if pixels is None or pixels.numel() == 0:
            return []
        out = self.model.model.get_image_features(
            pixel_values=pixels.to(self.device, self.dtype),
            image_sizes=batch["image_sizes"],
            return_dict=True,
            **self.image_kwargs(batch),
        )
        per_image = list(out.pooler_output)  # each [base + rows·(cols+1), H]
        return [VisualFeatures(self.image_token_id, torch.cat(per_image), [f.shape[0] for f in per_image])]

    # ---- training: pixel values flattened to [Σ tiles, 3, h, w], which concatenate across examples ----------
    def tiles(self, image_sizes: torch.Tensor, batch_num_images: Any = None) -> list[int]:
        """Tiles (base included) the model takes of each image."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        single = [n == 1 for n in batch_num_images for _ in range(n)] if batch_num_images is not None else None
        return [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            if single is None or single[i]
            else 1
            for i, size in enumerate(image_sizes.tolist())
        ]

    def vision_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        out = {"pixel_values_videos": batch["pixel_values_videos"]} if "pixel_values_videos" in batch else {}
        if batch.get("pixel_values") is None:
            return out
        sizes = batch["image_sizes"]
        counts = self.tiles(sizes, batch.get("batch_num_images"))
        pixels = torch.cat([p[:n] for p, n in zip(batch["pixel_values"], counts, strict=True)])
        extra = {k: v for k, v in self.image_kwargs(batch).items() if v is not None}
        return {"pixel_values": pixels, "image_sizes": sizes, **extra, **out}

    def image_token_counts(self, ids: Sequence[int], pixels: Any, num_images: int) -> list[int]:
        if pixels is None or "pixel_values" not in pixels:
            return []
        inputs = {**pixels, "pixel_values": pixels["pixel_values"].unsqueeze(0)}  # the processor reads [0][0]
        return [self.processor.replace_image_token(inputs, i).count(self.image_token) for i in range(num_images)]

    def first_images(self, pixels: Any, n: int) -> Any:
        if pixels is None:
            return None
        kept = {"pixel_values_videos": pixels["pixel_values_videos"]} if "pixel_values_videos" in pixels else {}
        if n and "pixel_values" in pixels:  # videos are never cut (see data.py); the first n images' tiles
            tiles = sum(self.tiles(pixels["image_sizes"], pixels.get("batch_num_images"))[:n])
            kept.update(pixel_values=pixels["pixel_values"][:tiles], image_sizes=pixels["image_sizes"][:n])
            if "batch_num_images" in pixels:  # images per stretch of the conversation, up to the first n
                per, left = [], n
                for c in pixels["batch_num_images"].tolist():
                    per, left = per + [min(c, left)], left - min(c, left)
                kept["batch_num_images"] = torch.tensor([c for c in per if c])
        return kept or None

    # ---- pictures -------------------------------------------------------------------------------------------
    def visual_layout(self, images: Sequence[Image.Image]) -> list[Layout]:
        """Per image: the base tile (g×g), then the unpadded anyres grid with its newline column drawn gray (for a
        OneVision multi-image prompt: the base tile and one gray newline cell)."""
        if not images:
            return []
        batch = self.processor.image_processor(images=self.processor_images(images), return_tensors="pt")
        g = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        tiles = self.tiles(batch["image_sizes"], batch.get("batch_num_images"))
        layouts: list[Layout] = []
        for i, img in enumerate(images):
            base = self.unnormalised(batch["pixel_values"][i, :1])[0]
            layouts.append((base, g, g, 0))
            if tiles[i] == 1:
                layouts.append((Image.new("RGB", (g, g), GRAY), 1, 1, 0))  # base tile + one newline
                continue
            rows, cols = self.grid_shape(img, g)
            cell = 8
            canvas = Image.new("RGB", ((cols + 1) * cell, rows * cell), GRAY)
            canvas.paste(img.convert("RGB").resize((cols * cell, rows * cell), Image.BICUBIC), (0, 0))
            layouts.append((canvas, rows, cols + 1, 0))
        return layouts

    def grid_shape(self, image: Image.Image, g: int) -> tuple[int, int]:
        """(rows, cols) of an image's unpadded (and, for OneVision, shrunk) grid, by the stock processor's count."""
        from transformers.image_processing_utils import select_best_resolution

        h, w = image.height, image.width
        best_h, best_w = select_best_resolution([h, w], self.processor.image_processor.image_grid_pinpoints)
        size = self.model.config.vision_config.image_size
        unpadded, rows = self.processor._get_unpadded_features(h, w, g, g, best_h // size, best_w // size)
        return rows, unpadded // rows


class LlavaOnevisionAdapter(VideoLayout, LlavaNextAdapter):
    """LLaVA-OneVision: NeXT's anyres images (grids over `anyres_max_N` tiles shrunk), base-only multi-image
    prompts, and video: frames pooled 2×2 by the model, one newline after the last frame."""

    model_types = ("llava_onevision",)
    takes_video = True

    def processor_images(self, images: Sequence[Image.Image]) -> Any:
        return [list(images)]  # one prompt's images together: several → the multi-image (base tile) path

    def image_kwargs(self, batch: Any) -> dict[str, Any]:
        return {"batch_num_images": batch.get("batch_num_images")}

    def frame_pixels(self, frames: Sequence[Image.Image]) -> torch.Tensor:
        """Frames → [F, 3, s, s]: each frame's base tile from the stock image processor (the video processor's
        resize to the tower's size, rescale and normalisation)."""
        out = self.processor.image_processor(images=[[f] for f in frames], return_tensors="pt")
        return out["pixel_values"][:, 0]

    def video_layout(self, videos: Sequence[Any]) -> list[Layout]:
        """One panel per frame with its pooled grid, then the video's newline as one gray cell."""
        g = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        pooled = -(-g // 2)
        layouts: list[Layout] = []
        for v in videos:
            layouts += [(img, pooled, pooled, 0) for img in self.unnormalised(self.frame_pixels(v.frames))]
            layouts.append((Image.new("RGB", (g, g), GRAY), 1, 1, 0))
        return layouts


class LlavaNextVideoAdapter(VideoLayout, LlavaNextAdapter):
    """LLaVA-NeXT-Video: NeXT's anyres images, and videos whose frames (CLIP's resize and center crop) are
    average-pooled 2×2 by the model, with no newline."""

    model_types = ("llava_next_video",)
    takes_video = True

    def frame_pixels(self, frames: Sequence[Image.Image]) -> torch.Tensor:
        """Frames → [F, 3, s, s] as the stock video processor prepares them: resized to the shortest edge,
        center-cropped, rescaled and normalised with the image processor's settings (its CLIP transforms)."""
        from transformers import CLIPImageProcessorPil

        ip = self.processor.image_processor
        clip = CLIPImageProcessorPil(
            size=dict(ip.size),
            crop_size=dict(ip.crop_size),
            image_mean=list(ip.image_mean),
            image_std=list(ip.image_std),
            resample=ip.resample,
        )
        return clip(images=list(frames), return_tensors="pt")["pixel_values"]

    def video_layout(self, videos: Sequence[Any]) -> list[Layout]:
        """One panel per frame with its pooled grid."""
        g = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        pooled = g // self.model.config.spatial_pool_stride
        return [(img, pooled, pooled, 0) for v in videos for img in self.unnormalised(self.frame_pixels(v.frames))]
