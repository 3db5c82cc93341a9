"""Tells a job's webhook that the job finished, without ever holding up a worker.

Deliveries wait in an in-memory schedule served by one thread, and are
retried with backoff (1 s, 2 s, 4 s, 8 s) when the receiver fails or cannot
be reached.  A delivery still pending when foreman stops is dropped: the job
itself is durable and can be fetched with GET /jobs/<id>.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

import requests

from .store import Job

log = logging.getLogger("foreman.webhook")


class WebhookNotifier:
    def __init__(self, render: Callable[[Job], bytes], attempts: int = 5,
                 first_delay: float = 1.0, timeout: float = 10.0) -> None:
        self._render, self._attempts = render, attempts
        self._first_delay, self._timeout = first_delay, timeout
        self._session = requests.Session()
        self._schedule: list[tuple[float, int, int, str, bytes]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="foreman-webhook", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def notify(self, job: Job) -> None:
        if not job.webhook:
            return
        self._push(time.monotonic(), 1, job.webhook, self._render(job))

    def _push(self, due: float, attempt: int, url: str, body: bytes) -> None:
        with self._cond:
            heapq.heappush(self._schedule, (due, next(self._order), attempt, url, body))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (
                        not self._schedule or self._schedule[0][0] > time.monotonic()):
                    wait = self._schedule[0][0] - time.monotonic() if self._schedule else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, attempt, url, body = heapq.heappop(self._schedule)
            self._deliver(attempt, url, body)

    def _deliver(self, attempt: int, url: str, body: bytes) -> None:
        try:
            response = self._session.post(url, data=body, timeout=self._timeout,
                                          headers={"Content-Type": "application/json"})
            if response.status_code < 300:
                return
            problem = f"answered {response.status_code}"
        except requests.RequestException as exc:
            problem = type(exc).__name__
        if attempt >= self._attempts:
            log.warning("webhook delivery gave up after %d attempts (%s)", attempt, problem)
            return
        delay = self._first_delay * 2 ** (attempt - 1)
        log.info("webhook delivery attempt %d failed (%s); retrying in %.0fs",
                 attempt, problem, delay)
        self._push(time.monotonic() + delay, attempt + 1, url, body)
