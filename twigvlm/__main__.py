"""`python -m twigvlm ...`: the same as the `twigvlm` console script."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
