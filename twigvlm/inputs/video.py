"""Reading user videos: a video file, a folder of frame images or a list of images → a `Video` of RGB frames.

This module owns video input: decoding files with PyAV, natural ordering of frame folders, sampling frames at a
target rate and capping their count, the one-line errors for bad videos, and `video_strip` (a row of frames for
pictures of kept tokens). It knows nothing of models: adapters turn a `Video` into their processor's input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import TwigVLMError, shown
from .images import load_image

# Seek to a chosen frame of a file when it is this far ahead of the decoder (seconds); decode up to it when closer.
# Seeking lands on the keyframe before the frame and decodes from there: past a keyframe interval it wins.
SEEK_GAP_S = 10.0


@dataclass(frozen=True)
class Video:
    """Frames of a video, in time order, with the instants they were taken."""

    frames: list[Image.Image]  # RGB
    fps: float  # the rate at which the returned frames are spaced in time
    timestamps: list[float]  # seconds, one per frame
    source: str  # what the frames came from, for messages


VideoInput = str | Path | Sequence[str | Path | Image.Image] | Video


def load_video(video: VideoInput, fps: float | None = None, max_frames: int | None = None) -> Video:
    """A `Video` from a video file, a folder of frame images, a list of images or a `Video`.

    A video file (anything FFmpeg decodes: MP4, WebM, MKV, AVI, ...) has its own frame rate; `fps` samples it
    uniformly in time at that rate (never more frames than the file has). A folder of frames (image files in the
    natural order of their names: frame2 before frame10; other files are ignored) and a list of images (PIL images
    or image paths) have no rate of their own: `fps` is their frame rate, 1.0 when not given. A `Video` is
    re-sampled like a file. `max_frames` then caps the count by taking frames uniformly over the whole clip, the
    first and the last kept. Only the chosen frames are decoded into images.
    """
    _check_sampling(fps, max_frames)
    if isinstance(video, Video):
        return _sample(video, fps, max_frames)
    if isinstance(video, (str, Path)):
        path = Path(video)
        if path.is_dir():
            return _load_folder(path, fps, max_frames)
        if not path.is_file():
            raise TwigVLMError(
                f"video {path} does not exist: pass a video file, a folder of frame images or a list of images"
            )
        return _load_file(path, fps, max_frames)
    if isinstance(video, Sequence):
        return _load_list(video, fps, max_frames)
    raise TwigVLMError(
        f"video ({shown(video)}) is invalid: give a path, a folder of frames, a list of images or a Video"
    )


def video_strip(video: Video, n: int = 8, height: int = 96) -> Image.Image:
    """A horizontal strip of up to `n` frames chosen evenly over the video, each scaled to `height` pixels."""
    if n < 1 or height < 1:
        raise TwigVLMError(f"a video strip needs n >= 1 frames of height >= 1 pixels, got n={n}, height={height}")
    frames = [video.frames[i] for i in uniform_indices(len(video.frames), n)]
    scaled = [f.resize((max(1, round(f.width * height / f.height)), height), Image.Resampling.BILINEAR) for f in frames]
    strip = Image.new("RGB", (sum(f.width for f in scaled), height))
    x = 0
    for f in scaled:
        strip.paste(f, (x, 0))
        x += f.width
    return strip


def uniform_indices(n: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(n), the first and the last included (all of them if n <= count)."""
    if n <= count:
        return list(range(n))
    if count == 1:
        return [0]
    return [int(i * (n - 1) / (count - 1) + 0.5) for i in range(count)]  # halves round up


def rate_indices(n: int, source_fps: float, fps: float | None) -> list[int]:
    """Indices of frames taken at `fps` from `n` frames at `source_fps` (all of them when fps is not lower)."""
    if fps is None or fps >= source_fps:
        return list(range(n))
    step = source_fps / fps
    return [math.floor(k * step + 1e-9) for k in range(math.ceil(n / step - 1e-9))]


def _check_sampling(fps: float | None, max_frames: int | None) -> None:
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf):
        raise TwigVLMError(f"fps must be a positive number of frames per second, got {fps!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise TwigVLMError(f"max_frames must be a whole number >= 1, got {max_frames!r}")


def _plan(n: int, source_fps: float, fps: float | None, max_frames: int | None) -> tuple[list[int], float]:
    """Which of `n` frames at `source_fps` to keep, and the rate at which the kept ones are spaced."""
    taken = rate_indices(n, source_fps, fps)
    rate = source_fps if fps is None else min(fps, source_fps)
    if max_frames is not None and len(taken) > max_frames:
        picks = uniform_indices(len(taken), max_frames)
        if max_frames > 1:
            rate *= (max_frames - 1) / (len(taken) - 1)
        taken = [taken[i] for i in picks]
    return taken, rate


def _sample(video: Video, fps: float | None, max_frames: int | None) -> Video:
    keep, rate = _plan(len(video.frames), video.fps, fps, max_frames)
    return Video([video.frames[i] for i in keep], rate, [video.timestamps[i] for i in keep], video.source)


def _from_images(
    items: Sequence[str | Path | Image.Image], fps: float | None, max_frames: int | None, source: str
) -> Video:
    """Frames from images or image files at `fps` (1.0 when not given); only the kept ones are opened."""
    rate = 1.0 if fps is None else float(fps)
    keep, kept_rate = _plan(len(items), rate, None, max_frames)
    return Video([load_image(items[i]) for i in keep], kept_rate, [i / rate for i in keep], source)


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _load_folder(path: Path, fps: float | None, max_frames: int | None) -> Video:
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions]
    if not files:
        raise TwigVLMError(
            f"frame folder {path} holds no images: put the frames in it as image files named in order "
            "(frame1.png, frame2.png, ...)"
        )
    files.sort(key=lambda p: _natural_key(p.name))
    return _from_images(files, fps, max_frames, f"frame folder {path}")


def _load_list(items: Sequence[str | Path | Image.Image], fps: float | None, max_frames: int | None) -> Video:
    if len(items) == 0:
        raise TwigVLMError("video is an empty list of frames: pass at least one image")
    for i, item in enumerate(items):
        if not isinstance(item, (str, Path, Image.Image)):
            raise TwigVLMError(f"video frame {i} ({shown(item)}) is not an image: pass PIL images or image paths")
    return _from_images(items, fps, max_frames, f"a list of {len(items)} frames")


def _still_picture(path: Path) -> bool:
    """Whether PIL reads the file as one picture (its header only); an animated GIF or WebP is a video."""
    try:
        with Image.open(path) as img:
            return img.format != "MPEG" and getattr(img, "n_frames", 1) == 1  # PIL reads an MPEG header too
    except Exception:  # noqa: BLE001 - not a picture PIL knows (a video file): left to FFmpeg
        return False


def _load_file(path: Path, fps: float | None, max_frames: int | None) -> Video:
    """Two passes over the file: list the frames' timestamps from its packets (no decoding), then decode only as
    far as the chosen frames need, turning only those into images. A still picture (one frame PIL reads) is
    refused: as a video it would be one frame at a made-up rate."""
    if _still_picture(path):
        raise TwigVLMError(f"video {path} is a still picture, not a video: pass it as an image (--image, image=)")
    try:
        import av
    except ImportError:
        raise TwigVLMError(f"reading video {path} needs PyAV: pip install av") from None
    try:
        with av.open(str(path)) as container:
            pts, source_fps = _frame_times(path, container)
        keep, rate = _plan(len(pts), source_fps, fps, max_frames)
        with av.open(str(path)) as container:
            frames, timestamps = _decode(container, keep, pts, source_fps)
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        if isinstance(e, TwigVLMError):
            raise
        raise TwigVLMError(
            f"video {path} is not a readable video ({type(e).__name__}): pass a file FFmpeg can decode (MP4, WebM, ...)"
        ) from None
    if not frames:
        raise TwigVLMError(f"video {path} has no decodable frames: the file is damaged; re-encode or fetch it again")
    return Video(frames, rate, timestamps, f"video {path}")


def _frame_times(path: Path, container) -> tuple[list[int | None], float]:
    """The presentation timestamps of the first video stream's frames, read from its packets without decoding
    (all None where the container does not give every packet one), and the stream's average frame rate."""
    if not container.streams.video:
        raise TwigVLMError(f"video {path} has no video stream, so no frames: pass a file with video in it")
    stream = container.streams.video[0]
    pts = [packet.pts for packet in container.demux(stream) if packet.size > 0]
    if not pts:
        raise TwigVLMError(f"video {path} has no frames: pass a video with at least one frame")
    pts = sorted(pts) if None not in pts and stream.time_base else [None] * len(pts)
    return pts, float(stream.average_rate or stream.guessed_rate or 1.0)


def _decode(
    container, keep: list[int], pts: list[int | None], source_fps: float
) -> tuple[list[Image.Image], list[float]]:
    """The frames at indices `keep` (presentation order) as RGB images, with their times from the first frame.
    A chosen frame more than SEEK_GAP_S ahead is reached by seeking to the keyframe before it; frames on the way
    are decoded and dropped."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    if pts[0] is None:
        return _decode_in_order(container.decode(stream), keep, source_fps)
    decoded, position = container.decode(stream), pts[0]
    frames: list[Image.Image] = []
    timestamps: list[float] = []
    for i in keep:
        if (pts[i] - position) * stream.time_base > SEEK_GAP_S:
            container.seek(pts[i], stream=stream, backward=True)  # flushes the decoder
            decoded = container.decode(stream)
        frame = next((f for f in decoded if f.pts is not None and f.pts >= pts[i]), None)
        if frame is None:
            break
        position = frame.pts
        frames.append(frame.to_image())  # converted to rgb24
        timestamps.append(float((frame.pts - pts[0]) * stream.time_base))
    return frames, timestamps


def _decode_in_order(decoded, keep: list[int], source_fps: float) -> tuple[list[Image.Image], list[float]]:
    """The frames at indices `keep`, counted as they come out of the decoder, timed by index / average rate."""
    wanted = set(keep)
    frames: list[Image.Image] = []
    for i, frame in enumerate(decoded):
        if i in wanted:
            frames.append(frame.to_image())
        if i >= keep[-1]:
            break
    return frames, [i / source_fps for i in keep[: len(frames)]]


def load_videos(video: VideoInput | Sequence[VideoInput] | None) -> list[Video]:
    """The videos of a request: None → none; a `Video`, a file, a folder or a list of frames → one; a list of
    `Video`s (or of lists of frames) → several, in order."""
    if video is None:
        return []
    if isinstance(video, (list, tuple)) and video and all(isinstance(v, (Video, list, tuple)) for v in video):
        return [load_video(v) for v in video]
    return [load_video(video)]
