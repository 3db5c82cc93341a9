"""foreman's cached view of the target: its models, what is loaded, and whether it is up.

A daemon thread polls `/api/tags` and `/api/ps` at start and then every
`poll_interval` into an immutable Snapshot that request threads read without
touching the network.  A failed poll makes foreman *degraded* while the last
known models keep being served; the first good poll clears it, and listeners
(the embedder warm-up) hear about every time the target becomes reachable.

Polls are single-flight: a model-name miss asks for a poll that *starts after*
the miss, so it sees a model pulled a moment ago; a burst of misses shares one
poll, and misses can start at most one poll per `miss_cooldown` seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import TargetBadAnswer, TargetHTTPError, TargetTransportError
from .target import TargetClient

log = logging.getLogger("foreman.inventory")

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"


def canonical_model_name(name: str) -> str:
    """`llama3` -> `registry.ollama.ai/library/llama3:latest`, lowercased, as Ollama matches."""
    name = name.strip().lower()
    last = name[name.rfind("/") + 1:]
    base, tag = name.rsplit(":", 1) if ":" in last else (name, DEFAULT_TAG)
    parts = base.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    return "/".join(parts) + ":" + (tag or DEFAULT_TAG)


@dataclass(frozen=True)
class Snapshot:
    """One consistent view of the target, replaced whole after every poll."""

    tags_body: bytes | None = None  # the target's /api/tags answer, served verbatim
    ps_body: bytes | None = None
    models: tuple[dict[str, Any], ...] = ()
    names: frozenset[str] = frozenset()
    loaded_names: frozenset[str] = frozenset()
    degraded: bool = True
    error: str | None = "not polled yet"
    last_success: float | None = None  # time.time() of the last good poll
    last_attempt: float | None = None

    @property
    def known(self) -> bool:
        """Whether any poll has ever succeeded."""
        return self.last_success is not None


def _models_of(body: Any, route: str) -> tuple[dict[str, Any], ...]:
    models = body.get("models") if isinstance(body, dict) else None
    if models is None and isinstance(body, dict) and route == "/api/ps":
        models = []
    if not isinstance(models, list) or not all(
        isinstance(m, dict) and isinstance(m.get("name", m.get("model")), str) for m in models
    ):
        raise ValueError(f"ollama answered GET {route} with JSON of an unexpected shape")
    return tuple(models)


def _names(models: tuple[dict[str, Any], ...]) -> frozenset[str]:
    return frozenset(
        canonical_model_name(m[key]) for m in models for key in ("name", "model")
        if isinstance(m.get(key), str)
    )


@dataclass
class _PollState:
    started: int = 0
    finished: int = 0
    in_flight: bool = False
    last_miss_poll: float = float("-inf")
    listeners: list[Callable[[], None]] = field(default_factory=list)


class Inventory:
    def __init__(
        self,
        client: TargetClient,
        poll_interval: float,
        miss_cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        poll_timeout: float | None = None,
    ) -> None:
        """`poll_timeout`: each poll's read timeout (the client's own when None); a
        poll that hangs past it is a failed poll."""
        self._client = client
        self._interval = poll_interval
        self._miss_cooldown = miss_cooldown
        self._poll_timeout = poll_timeout
        self._clock = clock
        self._snapshot = Snapshot()
        self._cond = threading.Condition()
        self._state = _PollState()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.poll_failures = 0
        self._thread = threading.Thread(target=self._run, name="foreman-poller", daemon=True)

    @property
    def poll_timeout(self) -> float | None:
        return self._poll_timeout

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def wait_for(self, predicate: Callable[[Snapshot], bool], timeout: float) -> bool:
        """Block until a poll leaves a snapshot satisfying `predicate`, or `timeout` passes."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._snapshot), timeout)

    def wake_waiters(self) -> None:
        """Wake every `wait_for` caller so it can re-check its predicate."""
        with self._cond:
            self._cond.notify_all()

    def on_reachable(self, listener: Callable[[], None]) -> None:
        """Call `listener` (on the poller thread) whenever the target becomes reachable."""
        self._state.listeners.append(listener)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def poll_soon(self) -> None:
        """Ask the poller for an early poll, without waiting for it (after a pull, say)."""
        self._wake.set()

    def has_model(self, name: str) -> bool:
        return canonical_model_name(name) in self._snapshot.names

    def is_loaded(self, name: str) -> bool:
        return canonical_model_name(name) in self._snapshot.loaded_names

    def known_absent(self, name: str) -> bool:
        """True only when a poll started after this call says the target lacks `name`.

        While the target cannot be polled the answer is False: let the target
        (or the job queue) decide, rather than refuse on stale knowledge.
        """
        if self.has_model(name):
            return False
        if self._snapshot.degraded and self._snapshot.last_attempt is not None:
            return False  # a re-poll would only fail again
        self.refresh(for_miss=True)
        snapshot = self._snapshot
        return not snapshot.degraded and canonical_model_name(name) not in snapshot.names

    def refresh(self, for_miss: bool = False) -> Snapshot:
        """Make sure a poll that starts after this call has finished; single-flight."""
        state = self._state
        with self._cond:
            wanted = state.started + 1
            while state.finished < wanted:
                if state.in_flight:
                    self._cond.wait()
                    continue
                if for_miss:
                    cooldown_left = state.last_miss_poll + self._miss_cooldown - self._clock()
                    if cooldown_left > 0:
                        self._cond.wait(cooldown_left)
                        continue
                    state.last_miss_poll = self._clock()
                state.in_flight = True
                state.started += 1
                self._cond.release()
                try:
                    self._poll_once()
                finally:
                    self._cond.acquire()
                    state.in_flight = False
                    state.finished = state.started
                    self._cond.notify_all()
        return self._snapshot

    def _fetch(self, route: str) -> tuple[bytes, tuple[dict[str, Any], ...]]:
        try:
            raw, body = self._client.call("GET", route, read_timeout=self._poll_timeout)
        except TargetBadAnswer:
            raise ValueError(f"ollama answered GET {route} with a body that is not JSON") from None
        except TargetHTTPError as exc:
            raise ValueError(
                f"ollama answered GET {route} with {exc.status}: {exc.message}"
            ) from None
        return raw, _models_of(body, route)

    def _poll_once(self) -> None:
        previous = self._snapshot
        now = time.time()
        try:
            tags_raw, models = self._fetch("/api/tags")
            ps_raw, running = self._fetch("/api/ps")
        except (TargetTransportError, ValueError) as exc:
            self.poll_failures += 1
            self._snapshot = dataclasses.replace(
                previous, degraded=True, error=str(exc), last_attempt=now
            )
            if not previous.degraded or previous.last_attempt is None:
                serving = " (serving the last known models)" if previous.known else ""
                log.warning("target degraded: %s%s", exc, serving)
            return
        self._snapshot = Snapshot(
            tags_raw, ps_raw, models, _names(models), _names(running),
            False, None, now, now,
        )
        if previous.degraded:
            log.info("target reachable: %d models", len(models))
            for listener in list(self._state.listeners):
                try:
                    listener()
                except Exception:
                    log.exception("inventory listener failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            try:
                self.refresh()
            except Exception:  # the poller must outlive any surprise
                log.exception("inventory poll failed unexpectedly")
            self._wake.wait(self._interval)
            self._wake.clear()
            # An early wake (a generation ended, a pull finished) still waits out
            # the cooldown: a stream of short generations polls once per cooldown.
            spacing = min(self._miss_cooldown, self._interval)
            self._stop.wait(max(0.0, started + spacing - self._clock()))
