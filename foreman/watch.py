"""Notices, for work that is blocked, that something it waits on is gone.

A request waiting for the chat slot, or a stream whose model is still
processing the prompt, writes nothing, so a failed write cannot reveal that
its client left; and a generation blocked reading from the target cannot
notice that the target went silent.  One thread polls every registered
"gone?" check (waitress's `client_disconnected`, or a watchdog clock) and
calls the registration's `on_gone`, again on every tick until it is
cancelled, so an action that raced with the work it cancels gets another
chance.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("foreman.watch")


class Watch:
    def __init__(self, watcher: ClientWatcher, is_gone: Callable[[], bool],
                 on_gone: Callable[[], None]) -> None:
        self._watcher, self.is_gone, self.on_gone = watcher, is_gone, on_gone

    def cancel(self) -> None:
        self._watcher._remove(self)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class ClientWatcher:
    def __init__(self, interval: float = 0.05) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="foreman-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def watch(self, is_gone: Callable[[], bool], on_gone: Callable[[], None]) -> Watch:
        watch = Watch(self, is_gone, on_gone)
        with self._lock:
            self._watches.add(watch)
        return watch

    def _remove(self, watch: Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                watches = list(self._watches)
            for watch in watches:
                try:
                    if watch.is_gone():
                        watch.on_gone()
                except Exception:
                    log.exception("client watch callback failed")
