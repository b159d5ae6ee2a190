"""``python -m recipes``: the recipes' command line (:mod:`recipes.cli`). ``python -m recipes --help``."""

import sys

from recipes.cli import main

if __name__ == "__main__":
    sys.exit(main())
