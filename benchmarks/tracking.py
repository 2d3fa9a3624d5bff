"""Dirty-tracking methods side by side; the code lives in ``pagescan.bench.tracking``
so that ``pagescan bench`` can run it from an installed copy. See ``--help``."""

import sys

from pagescan.bench.tracking import run

if __name__ == "__main__":
    sys.exit(run())
