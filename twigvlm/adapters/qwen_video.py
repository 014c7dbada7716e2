"""Qwen-VL video inputs without the stock video processor (which needs torchvision).

Frames already sampled by `twigvlm.video.load_video` go through the family's stock *image* processor one by one
(the same resize, rescale and normalisation as images, at one common size for the whole clip), and consecutive
frames are paired into the vision tower's temporal patches — the layout the stock video processor writes:
patches ordered (t, h-blocks, w-blocks, merge rows, merge cols), each patch (C, temporal, p, p). A clip with an
odd number of frames repeats its last frame, as the stock processor does. The placeholder text is the stock
processor's: `<|video_pad|>` × tokens for Qwen2/2.5-VL; for Qwen3-VL one `<t seconds><|vision_start|>…
<|vision_end|>` block per temporal patch, t the mean time of its frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import TwigVLMError


@dataclass
class VideoInputs:
    """One video, ready for the model: pixel_values_videos [t·h·w, C·tp·p·p], its grid (t, h, w) and the
    placeholder text that replaces the prompt's video token."""

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    placeholder: str
    seconds_per_grid: float  # time covered by one temporal patch (Qwen2.5-VL's second_per_grid_ts)


def _patches(image_processor: Any, frame: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """One frame through the stock image processor at a fixed (h, w) → [gh·gw, C, tp, p, p]."""
    ip = image_processor
    h, w = size
    out = ip(images=[frame.resize((w, h), Image.BICUBIC)], do_resize=False, return_tensors="np")
    patches = np.asarray(out["pixel_values"])  # [gh·gw, C·tp·p·p]
    return patches.reshape(patches.shape[0], 3, ip.temporal_patch_size, ip.patch_size, ip.patch_size)


def frame_size(image_processor: Any, frame: Image.Image) -> tuple[int, int]:
    """The (h, w) every frame of a clip is resized to: the image processor's own rule for the first frame."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = image_processor
    size = ip.size
    factor = ip.patch_size * ip.merge_size
    return smart_resize(
        frame.height, frame.width, factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"]
    )


def prepare_video(
    image_processor: Any, frames: list[Image.Image], timestamps: list[float], video_token: str, timestamps_text: bool
) -> VideoInputs:
    """Sampled frames (RGB) and their times in seconds → the model's video inputs and placeholder text."""
    if not frames:
        raise TwigVLMError("the video has no frames")
    ip = image_processor
    tp, merge = ip.temporal_patch_size, ip.merge_size
    frames, timestamps = list(frames), list(timestamps)
    while len(frames) % tp:  # pad to whole temporal patches with the last frame
        frames.append(frames[-1])
        timestamps.append(timestamps[-1])
    h, w = frame_size(ip, frames[0])
    per_frame = [_patches(ip, f, (h, w))[:, :, 0] for f in frames]  # each [gh·gw, C, p, p]
    groups = []
    for g in range(0, len(frames), tp):
        groups.append(np.stack(per_frame[g : g + tp], axis=2))  # [gh·gw, C, tp, p, p]
    pixels = np.concatenate(groups).reshape(len(groups) * per_frame[0].shape[0], -1)  # [t·gh·gw, C·tp·p·p]
    gh, gw = h // ip.patch_size, w // ip.patch_size
    t = len(groups)
    per_group = gh * gw // merge**2
    if timestamps_text:
        times = [float(np.mean(timestamps[g : g + tp])) for g in range(0, len(frames), tp)]
        placeholder = "".join(
            f"<{s:.1f} seconds><|vision_start|>{video_token * per_group}<|vision_end|>" for s in times
        )
    else:
        placeholder = video_token * (t * per_group)
    span = (timestamps[-1] - timestamps[0]) / max(len(frames) - 1, 1) * tp if len(frames) > 1 else 1.0
    return VideoInputs(torch.from_numpy(pixels), (t, gh, gw), placeholder, float(span) or 1.0)
