"""`python -m mct <stage> ...`: the same command line as the `mct` console script."""

import sys

from mct.cli import main

if __name__ == "__main__":
    sys.exit(main())
