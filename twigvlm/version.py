"""The package version, in a leaf every floor may read (`twigvlm.__version__` re-exports it)."""

__version__ = "0.1.0"
