"""`twigvlm.video`, the import path users write (`from twigvlm.video import load_video`): the video loaders live
in `twigvlm.inputs.video`."""

from .inputs.video import Video, VideoInput, load_video, load_videos, video_strip

__all__ = ["Video", "VideoInput", "load_video", "load_videos", "video_strip"]
