"""`python -m foreman` is `python foreman.py`."""

import sys

from .cli import main

sys.exit(main())
