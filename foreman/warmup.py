"""Keeps the configured embedding model loaded on the target.

An embed with empty input and `keep_alive: -1` makes Ollama load the model
and keep it resident.  It is sent on its own thread whenever the inventory
sees the target become reachable (at start, and after every outage, since a
restarted Ollama has forgotten it), so start-up and polling never wait on a
model load.  A failed attempt is retried after `retry_interval`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .errors import TargetBadAnswer, TargetHTTPError, TargetTransportError
from .target import TargetClient

log = logging.getLogger("foreman.warmup")


class EmbedderWarmer:
    def __init__(self, client: TargetClient, model: str, retry_interval: float,
                 on_loaded: Callable[[], None] = lambda: None) -> None:
        """`on_loaded` hears about each warm-up that loaded the model (the inventory
        polls again, so /api/ps shows it at once)."""
        self._client, self.model, self._retry = client, model, retry_interval
        self._on_loaded = on_loaded
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="foreman-warmup", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wanted.set()

    def request(self) -> None:
        """Ask for a warm-up soon; cheap, callable from any thread."""
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._stop.is_set():
                return
            self._wanted.clear()
            if not self._warm():
                self._stop.wait(self._retry)
                self._wanted.set()

    def _warm(self) -> bool:
        payload = {"model": self.model, "input": [], "keep_alive": -1}
        try:
            self._client.call("POST", "/api/embed", payload)
        except TargetTransportError as exc:
            log.info("embedder warm-up of %s postponed: %s", self.model, exc)
            return False
        except (TargetHTTPError, TargetBadAnswer) as exc:
            log.error("embedder warm-up of %s refused by the target: %s", self.model, exc)
            return False
        log.info("embedder %s loaded with keep_alive -1", self.model)
        self._on_loaded()
        return True
