"""foreman: a small daemon in front of one Ollama that queues, guards and remembers."""

__version__ = "0.1.0"
