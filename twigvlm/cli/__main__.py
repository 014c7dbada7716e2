"""`python -m twigvlm.cli ...`: the same as the `twigvlm` console script."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
