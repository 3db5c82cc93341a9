"""What this box has measured about each model, for estimating when work will start.

For each model an exponentially weighted average of how long a generation
holds the chat slot once the model is resident, and of how long loading it
takes.  Both are learned from Ollama's own account in a generation's final
message (`load_duration`, in nanoseconds): the load is what Ollama says it
spent loading, the generation is the rest of the time the slot was held, so a
first sample on a cold GPU is not mistaken for a slow generation.  An answer
without that account (the OpenAI-shaped routes) teaches the generation time
only, and only when the model looked resident.  Every load Ollama reports is
also counted, with its time, for /metrics.  The history is saved beside the
jobs (each model's at most every 30 s, and all of it at shutdown) and read back
at start, so estimates survive a restart.  A model with no history has no
estimate: callers say so rather than invent a number.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .inventory import canonical_model_name

SMOOTHING = 0.3  # weight of the newest sample
# Ollama reports a few milliseconds of "load" for a model already resident; a
# real load (weights into memory) takes far longer.
REAL_LOAD_SECONDS = 0.05
_LOAD_DURATION = re.compile(rb'"load_duration"\s*:\s*(\d+)')
_TAIL = 4096  # Ollama puts its durations at the end of the final message
# A model's history is written to the store at most this often (and at shutdown):
# a write per generation would sit between one job and the next.
SAVE_EVERY = 30.0


@dataclass
class ModelHistory:
    generation: float | None = None  # seconds the slot is held, model resident
    load: float | None = None  # seconds a load takes
    samples: int = 0
    loads: int = 0  # loads Ollama reported since this foreman started
    load_seconds: float = 0.0  # their total time


def load_seconds(final: bytes) -> float | None:
    """Ollama's `load_duration` from a final message, in seconds; None without one."""
    found = _LOAD_DURATION.search(final[-_TAIL:])
    return int(found.group(1)) / 1e9 if found else None


class Estimator:
    def __init__(self, history: Iterable[tuple[str, float | None, float | None, int]] = (),
                 save: Callable[[str, ModelHistory], None] | None = None) -> None:
        """`history`: (model, generation, load, samples) rows saved before;
        `save(model, history)` is called with each model's history as it changes."""
        self._lock = threading.Lock()
        self._models = {name: ModelHistory(generation, load, samples)
                        for name, generation, load, samples in history}
        self._save = save
        self._saved_at: dict[str, float] = {}  # model -> time.monotonic() of its last save
        self._unsaved: set[str] = set()

    def record(self, model: str, held: float, resident: bool, final: bytes = b"") -> None:
        """Learn from a generation that held the slot `held` seconds and ended with the
        target's `final` message; `resident`: whether the model looked loaded."""
        if not model:  # a forwarded route's work: what it ran, foreman cannot know
            return
        loaded = load_seconds(final)
        name = canonical_model_name(model)
        with self._lock:
            history = self._models.setdefault(name, ModelHistory())
            if loaded is None:
                if not resident and history.generation is not None:
                    return  # a load of unknown length hides in this sample
                history.generation = _ewma(history.generation, held)
            else:
                history.generation = _ewma(history.generation, max(0.0, held - loaded))
                if loaded >= REAL_LOAD_SECONDS:
                    history.load = _ewma(history.load, loaded)
                    history.loads += 1
                    history.load_seconds += loaded
            history.samples += 1
            self._unsaved.add(name)
            due = time.monotonic() - self._saved_at.get(name, -SAVE_EVERY) >= SAVE_EVERY
        if due:
            self.flush(name)

    def flush(self, only: str | None = None) -> None:
        """Save the history not saved yet (of one model, or of all)."""
        if self._save is None:
            return
        with self._lock:
            names = list(self._unsaved) if only is None else sorted(self._unsaved & {only})
            snapshots = [(name, ModelHistory(self._models[name].generation,
                                             self._models[name].load,
                                             self._models[name].samples)) for name in names]
            now = time.monotonic()
            for name in names:
                self._unsaved.discard(name)
                self._saved_at[name] = now
        for name, snapshot in snapshots:
            self._save(name, snapshot)

    def estimate(self, model: str, resident: bool) -> float | None:
        """Seconds the model's next generation will hold the slot, or None without history."""
        with self._lock:
            history = self._models.get(canonical_model_name(model))
            if history is None or history.generation is None:
                return None
            if resident:
                return history.generation
            return history.generation + (history.load or 0.0)

    def load_time(self, model: str) -> float | None:
        """Seconds loading `model` takes, as learned; None before its first load."""
        with self._lock:
            history = self._models.get(canonical_model_name(model))
            return None if history is None else history.load

    def known(self) -> dict[str, dict[str, float | int | None]]:
        with self._lock:
            return {name: {"generation_seconds": h.generation, "load_seconds": h.load,
                           "samples": h.samples} for name, h in self._models.items()}

    def loads(self) -> list[tuple[str, int, float]]:
        """(model, loads, seconds spent loading) since start, for /metrics."""
        with self._lock:
            return [(name, h.loads, h.load_seconds) for name, h in self._models.items()
                    if h.loads]


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else SMOOTHING * sample + (1 - SMOOTHING) * previous
