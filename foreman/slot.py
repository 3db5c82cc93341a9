"""The chat slot: how many generations run on the GPU at once, and who is next.

Interactive chat/generate requests and async jobs take a lease on the slot
before they reach the target.  Waiters are kept in one ordered line: first by
tier (interactive work always before jobs), then by priority, then by arrival,
so the order is fair and a later policy (say, grouping by model) only changes
the sort key.  A waiter can be cancelled from another thread (its client left,
or the daemon is shutting down) and then leaves the line at once.  A lease is
released exactly once, however many paths try.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import BUSY_TEXT, ApiError

INTERACTIVE, BATCH = 0, 1


class QueueFull(ApiError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(503, BUSY_TEXT, {"Retry-After": str(retry_after)})


class WaitTimeout(ApiError):
    def __init__(self, waited: float) -> None:
        super().__init__(
            503, f"server busy, timed out after waiting {waited:.1f}s for the chat slot",
            {"Retry-After": "1"},
        )


class WaitCancelled(ApiError):
    """The waiter was taken out of line: its client left, or foreman is stopping."""

    def __init__(self, reason: str, status: int = 503) -> None:
        super().__init__(status, reason, {"Retry-After": "1"})


@dataclass
class Work:
    """What a waiter or lease-holder is doing, for the queue view and the logs."""

    kind: str
    model: str
    tier: int = INTERACTIVE
    priority: int = 0
    label: str = ""
    resident: bool = True  # was the model loaded when this work joined the line?
    enqueued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    chunks: int = 0  # stream chunks relayed so far, for the queue view


class Lease:
    def __init__(self, slot: ChatSlot, work: Work, waited: float) -> None:
        self._slot, self.work, self.waited = slot, work, waited
        self._released = False

    def release(self) -> None:
        self._slot._release(self)


class Ticket:
    """A place in line; `wait` turns it into a Lease."""

    def __init__(self, slot: ChatSlot, work: Work, key: tuple[int, int, int]) -> None:
        self._slot, self.work, self.key = slot, work, key
        self._event = threading.Event()
        self._enqueued = time.monotonic()
        self.lease: Lease | None = None
        # Why and with which status it was taken out of line.  Data, not the
        # exception: one raised from here would hold this ticket in its traceback.
        self.cancelled: tuple[str, int] | None = None

    def __lt__(self, other: Ticket) -> bool:
        return self.key < other.key

    @property
    def waited(self) -> float:
        """Seconds spent in line: until granted, or so far."""
        if self.lease is not None:
            return self.lease.waited
        return time.monotonic() - self._enqueued

    def wait(self, timeout: float | None = None) -> Lease:
        """Block until granted; raise WaitTimeout or WaitCancelled otherwise."""
        self._event.wait(timeout)
        return self._slot._settle(self, time.monotonic() - self._enqueued)

    def cancel(self, reason: str, status: int = 503) -> None:
        """Take this ticket out of line; its `wait` raises WaitCancelled(reason, status)."""
        self._slot._cancel(self, (reason, status))


class ChatSlot:
    def __init__(self, concurrency: int, max_queue: int,
                 on_release: Callable[[Work, float], None] | None = None) -> None:
        """`on_release(work, seconds_held)` hears about every finished lease."""
        self.concurrency, self.max_queue = concurrency, max_queue
        self._on_release = on_release
        self._lock = threading.Condition()
        self._line: list[Ticket] = []
        self._holders: list[Lease] = []
        self._arrivals = itertools.count()
        self._closed_reason: str | None = None

    def enqueue(self, work: Work) -> Ticket:
        """Join the line (or take a free slot at once).  Raises QueueFull when full."""
        key = (work.tier, -work.priority, next(self._arrivals))
        ticket = Ticket(self, work, key)
        with self._lock:
            if self._closed_reason:
                raise WaitCancelled(self._closed_reason)
            interactive_waiting = sum(1 for t in self._line if t.work.tier == INTERACTIVE)
            if work.tier == INTERACTIVE and interactive_waiting >= self.max_queue and (
                self._line or len(self._holders) >= self.concurrency
            ):
                raise QueueFull(retry_after=max(1, len(self._line)))
            bisect.insort(self._line, ticket)
            self._grant_locked()
            self._lock.notify_all()
        return ticket

    def acquire(self, work: Work, timeout: float | None = None) -> Lease:
        return self.enqueue(work).wait(timeout)

    def close(self, reason: str) -> None:
        """Refuse new waiters and cancel every current one (shutdown)."""
        with self._lock:
            self._closed_reason = reason
            line, self._line = self._line, []
            self._lock.notify_all()
        for ticket in line:
            ticket.cancelled = (reason, 503)
            ticket._event.set()

    def wait_for(self, predicate: Callable[[ChatSlot], bool], timeout: float) -> bool:
        """Block until `predicate(slot)` holds after some change, or `timeout` passes."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self), timeout)

    def snapshot(self) -> tuple[list[Work], list[Work]]:
        """(running, waiting in order), as copies."""
        with self._lock:
            return [lease.work for lease in self._holders], [t.work for t in self._line]

    @property
    def waiting(self) -> int:
        return len(self._line)

    @property
    def in_flight(self) -> int:
        return len(self._holders)

    def _grant_locked(self) -> None:
        while self._line and len(self._holders) < self.concurrency:
            ticket = self._line.pop(0)
            ticket.work.started_at = time.time()
            ticket.lease = Lease(self, ticket.work, time.monotonic() - ticket._enqueued)
            self._holders.append(ticket.lease)
            ticket._event.set()

    def _settle(self, ticket: Ticket, waited: float) -> Lease:
        with self._lock:
            if ticket.lease is not None:
                return ticket.lease
            if ticket.cancelled is None:
                self._line.remove(ticket)
                self._lock.notify_all()
                raise WaitTimeout(waited)
        raise WaitCancelled(*ticket.cancelled)

    def _cancel(self, ticket: Ticket, why: tuple[str, int]) -> None:
        with self._lock:
            if ticket.lease is not None or ticket.cancelled is not None:
                return
            self._line.remove(ticket)
            ticket.cancelled = why
            self._lock.notify_all()
        ticket._event.set()

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if lease._released:
                return
            lease._released = True
            self._holders.remove(lease)
            self._grant_locked()
            self._lock.notify_all()
        if self._on_release is not None and lease.work.started_at is not None:
            self._on_release(lease.work, time.time() - lease.work.started_at)
