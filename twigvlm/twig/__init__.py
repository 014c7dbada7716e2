"""The twig: T trained decoder layers with a norm and a head after base layer K; grow, save, load, and the base
fingerprint that ties a saved twig to its base. `twigvlm.twig` keeps the names users import from it."""

from .fingerprint import base_fingerprint, check_fingerprint
from .model import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Twig,
    freeze_base,
    grow_twig,
    load_twig,
    load_twig_weights,
    read_twig_config,
    save_twig,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Twig",
    "base_fingerprint",
    "check_fingerprint",
    "freeze_base",
    "grow_twig",
    "load_twig",
    "load_twig_weights",
    "read_twig_config",
    "save_twig",
]
