"""The one user-facing error type: a problem with the user's input, stated in one line with its fix.

Everything that a user can get wrong (paths, images, prompts, budgets, twig/base mismatches) raises
`TwigVLMError`; the CLI turns it into one line on stderr and exit code 2. Bugs stay ordinary exceptions.
"""


class TwigVLMError(ValueError):
    """Bad input: the message names the problem and how to fix it, on one line."""
