"""``python -m rjem_ray``: the ``rjem`` command line, for environments without the console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
