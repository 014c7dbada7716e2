"""Video input: real files written with PyAV, frame folders and lists → the right frames, in order, at the right
times; sampling by rate and by count (which frames, told by their colour); every bad input → one-line error."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import twigvlm.inputs.video
from twigvlm.errors import TwigVLMError
from twigvlm.inputs.video import Video, load_video, video_strip

N, RATE, SIZE = 30, 10, 32


def colour(i: int) -> tuple[int, int, int]:
    """Frame i's colour: red up, green down, so a swapped channel order or a wrong frame is caught."""
    return (8 * i + 10, 200 - 5 * i, 60)


def index_of(frame: Image.Image) -> int:
    """Which frame this is, by the colour at its centre (lossy codecs move it by a few levels at most)."""
    assert frame.mode == "RGB" and frame.size == (SIZE, SIZE)
    pixel = np.array(frame.getpixel((SIZE // 2, SIZE // 2)), dtype=float)
    distances = [np.abs(pixel - colour(i)).max() for i in range(N)]
    best = int(np.argmin(distances))
    assert distances[best] <= 6, (pixel, colour(best))
    return best


def write_video(path: Path, n: int, codec: str = "mpeg4", rate: int = RATE, fmt: str | None = None) -> Path:
    """A video file of n solid frames, frame i in colour(i)."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
        for i in range(n):
            pixels = np.full((SIZE, SIZE, 3), colour(i), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(params=[math.inf, 0.0], ids=["decode-through", "seek"])
def seek_gap(request, monkeypatch) -> float:
    """Reach chosen frames by decoding the way there, or by seeking to the keyframe before each (every ~12 frames)."""
    monkeypatch.setattr(twigvlm.inputs.video, "SEEK_GAP_S", request.param)
    return request.param


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", N)


def frame_images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (SIZE, SIZE), colour(i)) for i in range(n)]


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])  # libx264 reorders frames (B-frames): presentation order
def test_a_file_gives_every_frame_in_order_with_its_time(tmp_path, codec, seek_gap):
    video = load_video(write_video(tmp_path / f"{codec}.mp4", N, codec=codec))
    assert [index_of(f) for f in video.frames] == list(range(N))
    assert video.fps == RATE
    assert video.timestamps == pytest.approx([i / RATE for i in range(N)], abs=1e-3)
    assert video.source == f"video {tmp_path / f'{codec}.mp4'}"


@pytest.mark.parametrize(
    ("fps", "max_frames", "indices", "rate"),
    [
        (2, None, [0, 5, 10, 15, 20, 25], 2.0),
        (4, None, [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27], 4.0),  # every 2.5 frames
        (25, None, list(range(N)), RATE),  # never more frames than the file has
        (None, 4, [0, 10, 19, 29], RATE * 3 / 29),  # first and last kept
        (None, 1, [0], RATE),
        (None, 99, list(range(N)), RATE),
        (2, 3, [0, 15, 25], 2.0 * 2 / 5),  # the rate first (0, 5, ..., 25), then the count over those
    ],
)
def test_sampling_a_file_takes_these_frames(clip, seek_gap, fps, max_frames, indices, rate):
    video = load_video(clip, fps=fps, max_frames=max_frames)
    assert [index_of(f) for f in video.frames] == indices
    assert video.timestamps == pytest.approx([i / RATE for i in indices], abs=1e-3)
    assert video.fps == pytest.approx(rate)


def test_a_stream_without_timestamps_is_counted_in_decoding_order(tmp_path):
    raw = write_video(tmp_path / "clip.h264", N, codec="libx264", fmt="h264")  # a bare H.264 stream: no pts
    video = load_video(raw, max_frames=4)
    assert [index_of(f) for f in video.frames] == [0, 10, 19, 29]
    assert video.timestamps == pytest.approx([i / 25 for i in (0, 10, 19, 29)])  # FFmpeg reads it at 25 fps


def test_a_folder_is_read_in_natural_order_and_only_its_images(tmp_path):
    for i, img in enumerate(frame_images(12)):
        img.save(tmp_path / f"frame{i + 1}.png")  # frame1 .. frame12: text order would put frame10 second
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "sub.png").mkdir()
    video = load_video(tmp_path)
    assert [index_of(f) for f in video.frames] == list(range(12))
    assert video.fps == 1.0 and video.timestamps == [float(i) for i in range(12)]
    assert video.source == f"frame folder {tmp_path}"
    capped = load_video(str(tmp_path), fps=5, max_frames=3)  # a folder's fps is its rate, not a sampling
    assert [index_of(f) for f in capped.frames] == [0, 6, 11]
    assert capped.timestamps == pytest.approx([0, 6 / 5, 11 / 5]) and capped.fps == pytest.approx(5 * 2 / 11)


def test_a_list_of_images_or_paths_becomes_rgb_frames(tmp_path):
    images = frame_images(6)
    images[1] = images[1].convert("L").convert("RGB")  # greyscale stays greyscale, converted to RGB
    mixed = [images[0], images[1].convert("L"), images[2].convert("RGBA"), *images[3:]]
    video = load_video(tuple(mixed), fps=2)
    assert all(f.mode == "RGB" for f in video.frames)
    assert [f.getpixel((0, 0)) for f in video.frames] == [img.getpixel((0, 0)) for img in images]
    assert video.fps == 2 and video.timestamps == [0, 0.5, 1.0, 1.5, 2.0, 2.5]
    images[4].save(tmp_path / "f.png")
    from_paths = load_video([tmp_path / "f.png", str(tmp_path / "f.png")])
    assert [index_of(f) for f in from_paths.frames] == [4, 4] and from_paths.fps == 1.0


def test_a_video_is_resampled_keeping_its_times(clip):
    video = load_video(clip)
    assert load_video(video) == video
    half = load_video(video, fps=5)
    assert [index_of(f) for f in half.frames] == list(range(0, N, 2)) and half.fps == 5
    ends = load_video(half, max_frames=2)
    assert [index_of(f) for f in ends.frames] == [0, 28]
    assert ends.timestamps == pytest.approx([0, 2.8], abs=1e-3) and ends.fps == pytest.approx(1 / 2.8)
    assert isinstance(ends, Video) and ends.source == video.source


def test_video_strip_shows_evenly_chosen_frames(clip):
    video = load_video(clip)
    strip = video_strip(video, n=4, height=16)
    assert strip.size == (4 * 16, 16) and strip.mode == "RGB"
    tiles = [strip.crop((16 * k, 0, 16 * (k + 1), 16)).resize((SIZE, SIZE)) for k in range(4)]
    assert [index_of(t) for t in tiles] == [0, 10, 19, 29]
    wide = video_strip(Video(frame_images(2)[:1] * 3, 1.0, [0.0, 1.0, 2.0], "x"), n=8, height=8)
    assert wide.size == (3 * 8, 8)  # fewer frames than n: all of them


def _bad_inputs(tmp: Path, clip: Path) -> dict[str, tuple[object, dict, str]]:
    (tmp / "notes.mp4").write_text("this is text, not a video")
    data = clip.read_bytes()
    (tmp / "partial.mp4").write_bytes(data[: len(data) // 2])
    write_video(tmp / "zero.avi", 0)  # a video stream with no frames
    write_video(tmp / "empty.mp4", 0)  # MP4 drops a stream without frames
    (tmp / "no-frames").mkdir()
    (tmp / "no-frames" / "readme.txt").write_text("frames go here")
    Image.new("RGB", (8, 8)).save(tmp / "still.png")
    return {
        "a still picture": (tmp / "still.png", {}, f"video {tmp / 'still.png'} is a still picture, not a video"),
        "missing": (tmp / "nope.mp4", {}, f"video {tmp / 'nope.mp4'} does not exist"),
        "text file": (tmp / "notes.mp4", {}, f"video {tmp / 'notes.mp4'} is not a readable video"),
        "truncated": (tmp / "partial.mp4", {}, f"video {tmp / 'partial.mp4'} is not a readable video"),
        "zero frames": (tmp / "zero.avi", {}, f"video {tmp / 'zero.avi'} has no frames"),
        "no stream": (tmp / "empty.mp4", {}, f"video {tmp / 'empty.mp4'} has no video stream, so no frames"),
        "folder without images": (tmp / "no-frames", {}, f"frame folder {tmp / 'no-frames'} holds no images"),
        "empty list": ([], {}, "video is an empty list of frames"),
        "non-image item": ([Image.new("RGB", (4, 4)), 3], {}, "video frame 1 (3) is not an image"),
        "missing frame file": ([tmp / "f.png"], {}, f"image {tmp / 'f.png'} does not exist"),
        "fps 0": (clip, {"fps": 0}, "fps must be a positive number of frames per second, got 0"),
        "fps < 0": (clip, {"fps": -2.5}, "fps must be a positive number of frames per second, got -2.5"),
        "fps nan": (clip, {"fps": math.nan}, "fps must be a positive number"),
        "max_frames 0": (clip, {"max_frames": 0}, "max_frames must be a whole number >= 1, got 0"),
        "max_frames 2.5": (clip, {"max_frames": 2.5}, "max_frames must be a whole number >= 1, got 2.5"),
        "not a video": (3.5, {}, "video (3.5) is invalid: give a path, a folder of frames"),
    }


def test_bad_inputs_are_one_line_errors(tmp_path, clip):
    for name, (video, kwargs, message) in _bad_inputs(tmp_path, clip).items():
        with pytest.raises(TwigVLMError) as exc:
            load_video(video, **kwargs)
        text = str(exc.value)
        assert message in text and "\n" not in text, (name, text)
        e = exc.value  # no av traceback chained to it
        assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), name


def test_an_animated_gif_is_a_video_and_a_still_one_is_not(tmp_path):
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert len(load_video(tmp_path / "moving.gif").frames) == 3  # FFmpeg decodes it, at its own rate
    frames[0].save(tmp_path / "still.gif")
    with pytest.raises(TwigVLMError, match="is a still picture, not a video"):
        load_video(tmp_path / "still.gif")
