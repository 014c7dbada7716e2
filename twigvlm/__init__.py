"""twigvlm: grow a twig on a frozen vision-language model to prune visual tokens and draft tokens.

Public API: `load`, `VLM`, the settings (`GenConfig`, `PruneConfig`, `SpecConfig`, `TwigConfig`), the result
(`GenerationResult`, `GenerationStats`) and `TwigVLMError`.
"""

from .api import VLM, load
from .config import GenConfig, PruneConfig, SpecConfig, TwigConfig
from .errors import TwigVLMError
from .generation.stats import GenerationResult, GenerationStats
from .version import __version__

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
