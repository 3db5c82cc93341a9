"""Lanes: how many pieces of work of one kind run on the target at once, and who is next.

foreman has two lanes built from this one class: the chat slot (chat and
generate, interactive requests and jobs) and the embed lane (embeddings,
requests and jobs).  Interactive requests and job workers take a ticket
before they reach the target.  Waiters are kept in one ordered line: first by
tier (interactive work always before jobs), then by priority, then by arrival.
A lane with a scheduler (the chat slot) lets it pick from that line instead of
taking the first (model affinity, a share for jobs) and hold the slot idle for
a moment; see `schedule`.  Only waiting interactive requests count against
`max_queue`; jobs wait in the store.

A ticket is a small state machine owned by its lane and changed only under
the lane's lock: WAITING -> GRANTED -> RELEASED, or WAITING -> CANCELLED (its
client left, its wait timed out, or the lane closed).  Each transition
happens once, however many threads try.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import BUSY_TEXT, ApiError
from .inventory import canonical_model_name
from .schedule import INTERACTIVE, Candidate, Scheduler

WAITING, GRANTED, RELEASED, CANCELLED = "waiting", "granted", "released", "cancelled"


class QueueFull(ApiError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(503, BUSY_TEXT, {"Retry-After": str(retry_after)})


class WaitTimeout(ApiError):
    def __init__(self, waited: float, lane: str) -> None:
        super().__init__(
            503, f"server busy, timed out after waiting {waited:.1f}s for the {lane}",
            {"Retry-After": "1"},
        )


class WaitCancelled(ApiError):
    """The waiter was taken out of line: its client left, or foreman is stopping."""

    def __init__(self, reason: str, status: int = 503) -> None:
        super().__init__(status, reason, {"Retry-After": "1"})


@dataclass
class Work:
    """What a waiter or holder is doing, for the queue view, the logs and the estimator."""

    kind: str
    model: str
    tier: int = INTERACTIVE
    priority: int = 0
    label: str = ""  # the request id, or the job id
    resident: bool = True  # was the model loaded when this work joined the line?
    enqueued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    chunks: int = 0  # stream chunks relayed so far, for the queue view
    answered: bool = False  # the target gave a complete answer: worth learning from
    final: bytes = b""  # the target's final message, whose tail has Ollama's durations
    out_of_order: str | None = None  # why it was served before earlier arrivals, if it was


class Ticket:
    """A place in a lane: waiting, then granted (a place on the target), then released."""

    def __init__(self, lane: Lane, work: Work, key: tuple[int, int, int]) -> None:
        self.lane, self.work, self.key = lane, work, key
        # Set by the lane, under its lock.
        self.state = WAITING
        self.cancelled_by: tuple[str, int] | None = None  # (reason, HTTP status)
        self.waited_seconds: float | None = None
        self.decided = threading.Event()  # set when the state leaves WAITING
        self.enqueued = time.monotonic()
        self.candidate: Candidate | None = None  # as a scheduler sees it, if there is one

    def __lt__(self, other: Ticket) -> bool:
        return self.key < other.key

    @property
    def waited(self) -> float:
        """Seconds spent in line: until granted or cancelled, or so far."""
        if self.waited_seconds is not None:
            return self.waited_seconds
        return time.monotonic() - self.enqueued

    def wait(self, timeout: float | None = None) -> Ticket:
        """Block until granted (returns self); raise WaitTimeout or WaitCancelled otherwise."""
        self.decided.wait(timeout)
        return self.lane._settle(self)

    def cancel(self, reason: str, status: int = 503) -> None:
        """Take a waiting ticket out of line; its `wait` raises WaitCancelled(reason, status)."""
        self.lane._cancel(self, (reason, status))

    def release(self) -> None:
        """Give the place back (idempotent; a no-op unless granted)."""
        self.lane._release(self)


class Lane:
    def __init__(self, name: str, concurrency: int, max_queue: int,
                 on_release: Callable[[Work, float], None] | None = None,
                 scheduler: Scheduler | None = None) -> None:
        """`concurrency` 0 means no limit.  `on_release(work, seconds_held)` hears about
        every released ticket whose work was answered.  Without a `scheduler` the
        first in line goes next."""
        self.name, self.concurrency, self.max_queue = name, concurrency, max_queue
        self._on_release = on_release
        self.scheduler = scheduler
        self._hold: threading.Timer | None = None
        self._lock = threading.Condition()
        self._line: list[Ticket] = []
        self._holders: list[Ticket] = []
        self._arrivals = itertools.count()
        self._closed_reason: str | None = None

    def enqueue(self, work: Work) -> Ticket:
        """Join the line (or take a free place at once).  Raises QueueFull when full."""
        ticket = Ticket(self, work, (work.tier, -work.priority, next(self._arrivals)))
        with self._lock:
            if self._closed_reason:
                raise WaitCancelled(self._closed_reason)
            if work.tier == INTERACTIVE and not self._has_room_locked():
                interactive_waiting = sum(1 for t in self._line if t.work.tier == INTERACTIVE)
                if interactive_waiting >= self.max_queue:
                    raise QueueFull(retry_after=max(1, len(self._line)))
            if self.scheduler is not None:
                ticket.candidate = _candidate(ticket)
                self.scheduler.arrived(work.model, work.tier == INTERACTIVE)
            bisect.insort(self._line, ticket)
            self._grant_locked()
            self._lock.notify_all()
        return ticket

    def acquire(self, work: Work, timeout: float | None = None) -> Ticket:
        return self.enqueue(work).wait(timeout)

    def close(self, reason: str) -> None:
        """Refuse new waiters and cancel every current one (shutdown)."""
        with self._lock:
            self._closed_reason = reason
            for ticket in list(self._line):
                self._cancel_locked(ticket, (reason, 503))

    def wait_for(self, predicate: Callable[[Lane], bool], timeout: float) -> bool:
        """Block until `predicate(lane)` holds after some change, or `timeout` passes."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self), timeout)

    def snapshot(self) -> tuple[list[Work], list[Work]]:
        """(running, waiting in order), as copies."""
        with self._lock:
            return [t.work for t in self._holders], [t.work for t in self._line]

    @property
    def waiting(self) -> int:
        return len(self._line)

    @property
    def in_flight(self) -> int:
        return len(self._holders)

    # -- transitions, each under the lock -------------------------------------------

    def _has_room_locked(self) -> bool:
        return self.concurrency == 0 or len(self._holders) < self.concurrency

    def _grant_locked(self) -> None:
        while self._line and self._has_room_locked():
            index, reason = 0, None
            if self.scheduler is not None:
                turn, hold_until = self.scheduler.pick(
                    [t.candidate for t in self._line if t.candidate is not None])
                if turn is None:
                    self._hold_until(hold_until)
                    return
                index, reason = turn.index, turn.reason
            ticket = self._line.pop(index)
            ticket.work.out_of_order = reason
            if self.scheduler is not None:
                self.scheduler.granted(ticket.key, ticket.work.model,
                                       ticket.work.tier == INTERACTIVE)
            ticket.state = GRANTED
            ticket.waited_seconds = time.monotonic() - ticket.enqueued
            ticket.work.started_at = time.time()
            self._holders.append(ticket)
            ticket.decided.set()

    def _hold_until(self, until: float | None) -> None:
        """Keep the slot idle until `until` (the scheduler's clock), then pick again."""
        if self._hold is not None or until is None or self.scheduler is None:
            return
        delay = max(0.0, until - self.scheduler.clock())
        self._hold = threading.Timer(delay, self._end_hold)
        self._hold.daemon = True
        self._hold.start()

    def _end_hold(self) -> None:
        with self._lock:
            self._hold = None
            self._grant_locked()
            self._lock.notify_all()

    def _cancel_locked(self, ticket: Ticket, why: tuple[str, int]) -> None:
        self._line.remove(ticket)
        if self.scheduler is not None:
            self.scheduler.forget(ticket.key)
        ticket.state = CANCELLED
        ticket.cancelled_by = why
        ticket.waited_seconds = time.monotonic() - ticket.enqueued
        ticket.decided.set()
        self._lock.notify_all()

    def _settle(self, ticket: Ticket) -> Ticket:
        with self._lock:
            if ticket.state == WAITING:
                waited = time.monotonic() - ticket.enqueued
                self._cancel_locked(ticket, (f"timed out after {waited:.1f}s", 503))
                raise WaitTimeout(waited, self.name)
            if ticket.state == CANCELLED:
                assert ticket.cancelled_by is not None
                # Raised from data, not stored: a stored exception would hold the
                # ticket in its traceback.
                raise WaitCancelled(*ticket.cancelled_by)
            return ticket

    def _cancel(self, ticket: Ticket, why: tuple[str, int]) -> None:
        with self._lock:
            if ticket.state == WAITING:
                self._cancel_locked(ticket, why)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.state != GRANTED:
                return
            ticket.state = RELEASED
            self._holders.remove(ticket)
            if self.scheduler is not None:
                work = ticket.work
                held = time.time() - work.started_at if work.started_at is not None else 0.0
                self.scheduler.released(work.model, work.tier == INTERACTIVE, held)
            self._grant_locked()
            self._lock.notify_all()
        work = ticket.work
        if self._on_release is not None and work.answered and work.started_at is not None:
            self._on_release(work, time.time() - work.started_at)


def _candidate(ticket: Ticket) -> Candidate:
    work = ticket.work
    model = canonical_model_name(work.model) if work.model else ""
    # Keyed by the ticket's place in line, not the ticket: a ticket holding its
    # candidate holding the ticket would be a reference cycle.
    return Candidate(ticket.key, work.tier, work.priority, model)
