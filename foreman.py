"""Run foreman: `python foreman.py -c config.yaml` (see README.md)."""

import sys

from foreman.cli import main

if __name__ == "__main__":
    sys.exit(main())
