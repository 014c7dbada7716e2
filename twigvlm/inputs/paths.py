"""Output paths, checked before anything is loaded or written: every command that writes refuses a folder path
that is a file (or lies inside one), a file path that is a folder, and a twig folder that already holds a twig.
Each refusal is one `TwigVLMError` line that names the flag. Importing this module imports no torch: the
commands read their flags without it."""

from __future__ import annotations

from pathlib import Path

from ..errors import TwigVLMError


def _first_existing(path: Path) -> Path | None:
    return next((p for p in (path, *path.parents) if p.exists()), None)


def output_dir(path: str | Path, flag: str = "--out") -> Path:
    """A folder a command may create or write into: the path, or the nearest of its parents that exists, must
    be a directory."""
    out = Path(path)
    blocker = _first_existing(out)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == out else f"lies inside {blocker}, which is a file"
        raise TwigVLMError(f"{flag} {out} {where}: give a folder path")
    return out


def output_file(path: str | Path, flag: str) -> Path:
    """A file a command may write: not a folder, and its folder must already exist."""
    out = Path(path)
    if out.is_dir():
        raise TwigVLMError(f"{flag} {out} is a folder: give a file path")
    if not out.parent.is_dir():
        raise TwigVLMError(f"{flag} {out}: its folder {out.parent} does not exist (or is a file)")
    return out


def twig_output_dir(path: str | Path, force: bool = False, flag: str = "--out") -> Path:
    """A folder to save a new twig into: refused when it already holds one, unless `force`."""
    from ..twig.model import CONFIG_NAME, WEIGHTS_NAME  # torch: here, not when the command line is read

    out = output_dir(path, flag)
    held = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if (out / name).exists()]
    if held and not force:
        raise TwigVLMError(
            f"{flag} {out} already holds a twig ({held[0]}): pass --force to replace it, or choose another path"
        )
    return out
