"""Named models: short names such as "demo" that stand for a model, and its twig, that a package ships.

This module is the one place where such a name is resolved. A package registers a name in the
`twigvlm.named_models` entry-point group, pointing at a `NamedModel` — twigvlm registers its own demo model that
way, in pyproject.toml — so nothing here imports the package that ships it, and the adapter registry below only
ever sees model directories and loaded models. `api.VLM`, the training recipe and the bench resolve their model
and twig arguments here. A name wins over a directory of the same name: write `./demo` for the directory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import torch

from ..adapters import VLMAdapter, adapter_class, check_device, load_adapter, parse_dtype
from ..adapters.capabilities import PixelRange, require_class
from ..errors import TwigVLMError
from .hub import check_model_path, local_config, resolve_model_dir

ENTRY_POINT_GROUP = "twigvlm.named_models"


@dataclass(frozen=True)
class NamedModel:
    """What a name stands for: a loader of the model's adapter and, if it ships one, its twig's directory."""

    load: Callable[[torch.dtype, str], VLMAdapter]  # (dtype, device) → the wrapped model
    twig_dir: Callable[[], Path] | None = None  # → the directory of the shipped twig
    decoder_gguf: Callable[[], Path] | None = None  # → its decoder as a GGUF file (the bench's llama.cpp peer)


# twigvlm's own names, also where the package runs from a source tree without being installed (no entry points).
BUILT_IN = {"demo": "twigvlm.demo.model:NAMED"}


@functools.cache
def _registered() -> dict[str, EntryPoint]:
    own = {name: EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in BUILT_IN.items()}
    return {**own, **{ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}}


def names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_registered())


def lookup(name: str | Path) -> NamedModel | None:
    """The named model that `name` stands for, or None when it is not a registered name (then it is a path)."""
    ep = _registered().get(str(name))
    if ep is None:
        return None
    named = ep.load()
    if not isinstance(named, NamedModel):
        raise TwigVLMError(f"the named model {str(name)!r} points at {ep.value}, which is not a twigvlm NamedModel")
    return named


def load_model(model: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> VLMAdapter:
    """The adapter of a named model, a saved Hugging Face VLM directory, or a hub id ("owner/name") in the cache."""
    named = lookup(model)
    if dtype == "auto":
        from ..runtime.machine import auto_dtype

        dtype = auto_dtype(str(device))
    torch_dtype = parse_dtype(dtype)
    check_device(device)  # before a hub id may start a download
    if named is None:
        return load_adapter(resolve_model_dir(model), dtype=torch_dtype, device=device)
    return named.load(torch_dtype, device)


def check_model_name(model: str | Path) -> None:
    """A model argument that cannot name a model — not a registered name, not a directory, not shaped like a hub
    id — is one line now, before a slow start; whether a hub id exists is learnt when it loads."""
    if lookup(model) is None:
        check_model_path(model)


def check_pixel_range(model: str | Path, min_pixels: int | None, max_pixels: int | None) -> None:
    """min_pixels / max_pixels before the load: an empty range, or a model whose config (on disk, nothing fetched)
    names a family without an image size range, is one line now rather than after the load (the bounds that need
    the processor are checked after it)."""
    if min_pixels is not None and max_pixels is not None and max_pixels < min_pixels:
        raise TwigVLMError(f"pixel range {min_pixels}..{max_pixels} is invalid: min_pixels must not exceed max_pixels")
    config = None if lookup(model) is not None else local_config(model)
    family = adapter_class(config) if config is not None else None
    if family is not None:
        require_class(family, PixelRange, "min_pixels / max_pixels")


def twig_directory(twig: str | Path) -> Path:
    """The directory a twig argument names: a named model's shipped twig, or the path itself."""
    named = lookup(twig)
    if named is None:
        return Path(twig)
    if named.twig_dir is None:
        raise TwigVLMError(f"the named model {str(twig)!r} ships no twig: pass a twig directory")
    return named.twig_dir()
