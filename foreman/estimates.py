"""What this box has measured about each model, for estimating when work will start.

For each model an exponentially weighted average of how long a generation
holds the chat slot when the model is already resident, and of the extra time
it takes when it is not (the load).  A model with no history has no estimate:
callers say so rather than invent a number.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .inventory import canonical_model_name

SMOOTHING = 0.3  # weight of the newest sample


@dataclass
class ModelHistory:
    generation: float | None = None  # seconds, resident model
    load: float | None = None  # extra seconds when not resident
    samples: int = 0


class Estimator:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, ModelHistory] = {}

    def record(self, model: str, seconds: float, resident: bool) -> None:
        if not model:  # a forwarded route's work: what it ran, foreman cannot know
            return
        with self._lock:
            history = self._models.setdefault(canonical_model_name(model), ModelHistory())
            history.samples += 1
            if resident or history.generation is None:
                history.generation = _ewma(history.generation, seconds)
            elif not resident:
                history.load = _ewma(history.load, max(0.0, seconds - history.generation))

    def estimate(self, model: str, resident: bool) -> float | None:
        """Seconds the model's next generation will hold the slot, or None without history."""
        with self._lock:
            history = self._models.get(canonical_model_name(model))
            if history is None or history.generation is None:
                return None
            if resident:
                return history.generation
            return history.generation + (history.load or 0.0)

    def known(self) -> dict[str, dict[str, float | int | None]]:
        with self._lock:
            return {name: {"generation_seconds": h.generation, "load_seconds": h.load,
                           "samples": h.samples} for name, h in self._models.items()}


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else SMOOTHING * sample + (1 - SMOOTHING) * previous
