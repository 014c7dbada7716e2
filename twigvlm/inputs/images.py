"""Reading user images: paths or PIL images → RGB PIL images, with one-line errors for bad files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import TwigVLMError, shown

# Modes that convert to RGB without losing meaning; others (32-bit int/float, 16-bit grey) are refused.
CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"}

ImageInput = str | Path | Image.Image


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path or a PIL image."""
    if isinstance(image, Image.Image):
        img, source = image, "the given image"
    elif not isinstance(image, str | Path):
        raise TwigVLMError(f"image ({shown(image)}) is not a picture: give a file path or a PIL image")
    else:
        path = Path(image)
        if path.is_dir():
            raise TwigVLMError(f"image {path} is a directory: pass the path of an image file")
        if not path.is_file():
            raise TwigVLMError(f"image {path} does not exist: pass the path of an image file")
        try:
            img = Image.open(path)
            img.load()
        except Image.DecompressionBombError:
            raise TwigVLMError(
                f"image {path} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels): downscale it first"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise TwigVLMError(
                f"image {path} is not a readable image ({type(e).__name__}): "
                "pass a PNG, JPEG or other file PIL can open"
            ) from None
        source = f"image {path}"
    if img.mode not in CONVERTIBLE_MODES:
        raise TwigVLMError(
            f"{source} has mode {img.mode!r}, which has no faithful RGB conversion: save it as 8-bit RGB or greyscale"
        )
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # composite transparency onto white, as a viewer shows it
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_images(images: ImageInput | Sequence[ImageInput] | None) -> list[Image.Image]:
    """A list of RGB images from None, one image, or a sequence of them."""
    if images is None:
        return []
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    if not isinstance(images, Sequence):
        raise TwigVLMError(f"image ({shown(images)}) is not a picture: give a file path, a PIL image or a list of them")
    return [load_image(i) for i in images]
