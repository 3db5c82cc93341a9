"""A lane alone: order, tiers, limits, cancellation, release exactly once."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from foreman.errors import ApiError
from foreman.lane import (
    BUSY_TEXT,
    Lane,
    QueueFull,
    Ticket,
    WaitCancelled,
    WaitTimeout,
    Work,
)
from foreman.schedule import BATCH


def test_free_slot_is_granted_at_once_and_released_once() -> None:
    slot = Lane("chat slot", concurrency=1, max_queue=4)
    lease = slot.acquire(Work("chat", "m"))
    assert slot.in_flight == 1 and lease.waited >= 0
    lease.release()
    lease.release()
    assert slot.in_flight == 0
    again = slot.acquire(Work("chat", "m"))  # a double release must not have freed two places
    other = slot.enqueue(Work("chat", "m"))
    assert slot.waiting == 1
    again.release()
    other.wait(1).release()


def test_waiters_are_served_in_arrival_order_and_interactive_first() -> None:
    slot = Lane("chat slot", concurrency=1, max_queue=10)
    holder = slot.acquire(Work("chat", "m"))
    job_low = slot.enqueue(Work("job", "m", tier=BATCH, priority=0, label="job-low"))
    job_high = slot.enqueue(Work("job", "m", tier=BATCH, priority=5, label="job-high"))
    first = slot.enqueue(Work("chat", "m", label="first"))
    second = slot.enqueue(Work("chat", "m", label="second"))
    running, waiting = slot.snapshot()
    assert len(running) == 1
    assert [w.label for w in waiting] == ["first", "second", "job-high", "job-low"]
    order = []
    lease = holder
    for ticket in (first, second, job_high, job_low):
        lease.release()
        lease = ticket.wait(1)
        order.append(lease.work.label)
    lease.release()
    assert order == ["first", "second", "job-high", "job-low"]


def test_queue_full_is_ollamas_busy_answer() -> None:
    slot = Lane("chat slot", concurrency=1, max_queue=2)
    slot.acquire(Work("chat", "m"))
    slot.enqueue(Work("chat", "m"))
    slot.enqueue(Work("chat", "m"))
    with pytest.raises(QueueFull) as full:
        slot.enqueue(Work("chat", "m"))
    assert full.value.status == 503 and full.value.message == BUSY_TEXT
    assert int(full.value.headers["Retry-After"]) >= 1
    slot.enqueue(Work("job", "m", tier=BATCH))  # jobs are not bounded by max_queue


def test_max_queue_zero_still_allows_the_free_slot() -> None:
    slot = Lane("chat slot", concurrency=1, max_queue=0)
    lease = slot.acquire(Work("chat", "m"))
    with pytest.raises(QueueFull):
        slot.enqueue(Work("chat", "m"))
    lease.release()


def test_wait_timeout_leaves_the_line() -> None:
    slot = Lane("chat slot", concurrency=1, max_queue=2)
    slot.acquire(Work("chat", "m"))
    with pytest.raises(WaitTimeout) as timed_out:
        slot.enqueue(Work("chat", "m")).wait(0.05)
    assert timed_out.value.status == 503 and slot.waiting == 0


def test_cancel_from_another_thread_wakes_the_waiter() -> None:
    slot = Lane("chat slot", concurrency=1, max_queue=2)
    slot.acquire(Work("chat", "m"))
    ticket = slot.enqueue(Work("chat", "m"))
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            ticket.wait()
        except ApiError as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    ticket.cancel("client went away", 499)
    waiter.join(2)
    assert not waiter.is_alive()
    assert outcome[0].status == 499 and slot.waiting == 0


def test_cancel_after_grant_keeps_the_lease() -> None:
    slot = Lane("chat slot", concurrency=1, max_queue=2)
    ticket = slot.enqueue(Work("chat", "m"))
    ticket.cancel("late")
    lease = ticket.wait(0)
    assert slot.in_flight == 1
    lease.release()
    assert slot.in_flight == 0


def test_close_cancels_waiters_and_refuses_newcomers() -> None:
    slot = Lane("chat slot", concurrency=1, max_queue=2)
    holder = slot.acquire(Work("chat", "m"))
    ticket = slot.enqueue(Work("chat", "m"))
    slot.close("foreman is shutting down")
    with pytest.raises(WaitCancelled, match="shutting down"):
        ticket.wait(1)
    with pytest.raises(WaitCancelled):
        slot.enqueue(Work("chat", "m"))
    holder.release()
    assert slot.in_flight == 0


def test_concurrency_two_runs_two() -> None:
    slot = Lane("chat slot", concurrency=2, max_queue=2)
    a, b = slot.acquire(Work("chat", "m")), slot.acquire(Work("chat", "m"))
    third = slot.enqueue(Work("chat", "m"))
    assert slot.in_flight == 2 and slot.waiting == 1
    a.release()
    third.wait(1).release()
    b.release()


@pytest.fixture
def switch_often() -> Iterator[None]:
    """Switch threads every microsecond, so a race window of a few bytecodes is hit."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_close_racing_waits_that_time_out_gives_only_lane_answers(
        switch_often: None) -> None:
    """Regression (issue 13.16): close() marked waiters cancelled outside its lock, so a
    wait that timed out in that window raised ValueError (a 500) instead of a 503."""
    odd: list[BaseException] = []
    for _ in range(100):
        lane = Lane("chat slot", concurrency=1, max_queue=50)
        lane.acquire(Work("chat", "m"))
        tickets = [lane.enqueue(Work("chat", "m")) for _ in range(40)]
        go = threading.Barrier(len(tickets) + 1)

        def wait(ticket: Ticket, go: threading.Barrier = go) -> None:
            go.wait()
            try:
                ticket.wait(0)
            except (WaitTimeout, WaitCancelled):
                pass
            except Exception as exc:  # anything else is the bug
                odd.append(exc)

        waiters = [threading.Thread(target=wait, args=(t,)) for t in tickets]
        for waiter in waiters:
            waiter.start()
        go.wait()
        lane.close("foreman is shutting down")
        for waiter in waiters:
            waiter.join(5)
        assert lane.waiting == 0
    assert not odd, odd[:3]


def test_unlimited_concurrency_never_queues() -> None:
    lane = Lane("embed lane", concurrency=0, max_queue=0)
    tickets = [lane.acquire(Work("embed", "m")) for _ in range(100)]
    assert lane.in_flight == 100 and lane.waiting == 0
    for ticket in tickets:
        ticket.release()
    assert lane.in_flight == 0


def test_only_answered_work_is_reported_on_release() -> None:
    heard: list[str] = []
    lane = Lane("chat slot", 1, 4, on_release=lambda work, held: heard.append(work.label))
    for label, answered in (("refused", False), ("answered", True), ("left", False)):
        ticket = lane.acquire(Work("chat", "m", label=label))
        ticket.work.answered = answered
        ticket.release()
        ticket.release()
    assert heard == ["answered"]
