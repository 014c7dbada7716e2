"""The one user-facing error type: a problem with the user's input, stated in one line with its fix.

Everything that a user can get wrong (paths, images, prompts, budgets, twig/base mismatches) raises
`TwigVLMError`; the CLI turns it into one line on stderr and exit code 2. Bugs stay ordinary exceptions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class TwigVLMError(ValueError):
    """Bad input: the message names the problem and how to fix it, on one line."""


def shown(value: object, limit: int = 40) -> str:
    """A value as an error message quotes it, on one line: its repr when short, else its type ("a ndarray")."""
    text = repr(value)
    return text if len(text) <= limit and "\n" not in text else f"a {type(value).__name__}"


def require_batch_one(batch: int, what: str) -> None:
    """The explicit check where code takes one encoded prompt (a batch is a list of requests, each encoded alone)."""
    if batch != 1:
        raise TwigVLMError(
            f"{what} takes one prompt per encoding, and got a batch of {batch}: encode each prompt on its own and "
            "pass them to VLM.generate as a list of requests, which batches them"
        )


def module_main(main: Callable[[list[str] | None], object], name: str, argv: list[str] | None = None) -> int:
    """Run a `python -m` module's main the way the CLI runs a command: a TwigVLMError becomes one line on stderr
    and exit code 2, with no traceback."""
    try:
        main(argv)
    except TwigVLMError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    return 0
