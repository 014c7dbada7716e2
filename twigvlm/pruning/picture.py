"""The kept-token picture: each image (and each video frame) as the model saw it, with pruned patches dimmed,
side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..adapters.base import Layout, VLMAdapter
from ..adapters.capabilities import PictureLayout, VideoLayout, require
from ..errors import TwigVLMError

DIM = 0.25  # brightness left to a pruned patch
MIN_SIDE = 336  # small inputs are enlarged (nearest neighbour) so that patches stay visible
GAP = 8


def picture_layout(adapter: VLMAdapter, images: Sequence[Image.Image], videos: Sequence[Any] = ()) -> list[Layout]:
    """Each image's layout (`PictureLayout.visual_layout`), then each video's as a strip of frames (one panel
    per temporal patch), or a one-line error for a family without them."""
    layouts = require(adapter, PictureLayout, "the kept-token picture").visual_layout(images)
    if videos:
        layouts += require(adapter, VideoLayout, "the kept-token picture of a video").video_layout(videos)
    return layouts


def kept_picture(layout: Sequence[Layout], kept_indices: Sequence[int] | None) -> Image.Image:
    """layout: (image, rows, cols, leading tokens) per image (`VLMAdapter.visual_layout`); kept_indices: kept
    tokens among all images' tokens, 0-based (None: all kept)."""
    kept = None if kept_indices is None else set(kept_indices)
    panels, offset = [], 0
    for image, rows, cols, lead in layout:
        offset += lead  # a CLS token has no patch to draw
        factor = max(1, -(-MIN_SIDE // min(image.size)))
        panel = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
        dimmed = Image.eval(panel, lambda v: int(v * DIM))
        ph, pw = panel.height / rows, panel.width / cols
        mask = Image.new("L", panel.size, 0)  # 255 where the patch was pruned
        draw = ImageDraw.Draw(mask)
        for r in range(rows):
            for c in range(cols):
                if kept is not None and offset + r * cols + c not in kept:
                    draw.rectangle(
                        [round(c * pw), round(r * ph), round((c + 1) * pw) - 1, round((r + 1) * ph) - 1], fill=255
                    )
        panels.append(Image.composite(dimmed, panel, mask))
        offset += rows * cols
    canvas = Image.new(
        "RGB", (sum(p.width for p in panels) + GAP * (len(panels) - 1), max(p.height for p in panels)), (255, 255, 255)
    )
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + GAP
    return canvas


def picture_format(path: str | Path) -> str:
    """The format a kept-token picture is written in: the one its suffix names (PNG without a suffix), or a
    one-line error for a suffix no writer of PIL's takes."""
    suffix = Path(path).suffix.lower()
    if not suffix:
        return "PNG"
    Image.init()  # every plugin registered, so every suffix PIL can write is known
    kind = Image.registered_extensions().get(suffix)
    if kind is None or kind not in Image.SAVE:
        raise TwigVLMError(f"--save-kept {path}: PIL writes no {suffix} pictures: use .png, .jpg or .webp")
    return kind


def save_kept_picture(layout: Sequence[Layout], kept_indices: Sequence[int] | None, path: str | Path) -> Path:
    path = Path(path)
    if not layout:
        raise TwigVLMError("--save-kept needs at least one image or video")
    try:
        kept_picture(layout, kept_indices).save(path, format=picture_format(path))
    except OSError as e:
        raise TwigVLMError(f"cannot write {path} ({e.strerror or e}): choose a writable path") from None
    return path
