"""twigvlm: grow a twig on a frozen vision-language model to prune visual tokens and draft tokens.

Public API: `load`, `VLM`, the settings (`GenConfig`, `PruneConfig`, `SpecConfig`, `TwigConfig`), the result
(`GenerationResult`, `GenerationStats`) and `TwigVLMError`.

The names load on first use (PEP 562), so `import twigvlm` — and with it `twigvlm --help`, `--version` and every
usage error of the console script — does not wait for torch and transformers to import.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time `__getattr__` imports each name on first use
    from .api import VLM, load
    from .config import GenConfig, PruneConfig, SpecConfig, TwigConfig
    from .errors import TwigVLMError
    from .generation.stats import GenerationResult, GenerationStats

# public name → the module that defines it
_EXPORTS = {
    "GenConfig": "twigvlm.config",
    "GenerationResult": "twigvlm.generation.stats",
    "GenerationStats": "twigvlm.generation.stats",
    "PruneConfig": "twigvlm.config",
    "SpecConfig": "twigvlm.config",
    "TwigConfig": "twigvlm.config",
    "TwigVLMError": "twigvlm.errors",
    "VLM": "twigvlm.api",
    "load": "twigvlm.api",
}

__all__ = [
    "GenConfig",
    "GenerationResult",
    "GenerationStats",
    "PruneConfig",
    "SpecConfig",
    "TwigConfig",
    "TwigVLMError",
    "VLM",
    "load",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a subpackage, `twigvlm.api.VLM` as ever
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'twigvlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
