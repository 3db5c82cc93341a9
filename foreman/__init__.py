"""foreman: a small daemon in front of one Ollama that queues, guards and remembers.

The public Python API is these names and nothing else (see README, "Use from
Python"): `Foreman` runs the daemon inside the calling process, `Client` talks
to a running one's job queue, and both raise `ForemanError`.
"""

__version__ = "0.1.0"  # before the imports: the modules below read it

from .client import Client, ForemanError
from .daemon import Foreman

__all__ = ["Client", "Foreman", "ForemanError"]
