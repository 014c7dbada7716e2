"""`twigvlm.images`, the import path users write (`from twigvlm.images import load_image`): the image loaders
live in `twigvlm.inputs.images`."""

from .inputs.images import ImageInput, load_image, load_images

__all__ = ["ImageInput", "load_image", "load_images"]
