"""Where everyone is in line for the chat slot, and when their turn should come.

The line is what the chat slot holds (interactive requests always first)
followed by the queued chat/generate jobs.  Its order is the scheduler's: the
view plays the scheduler's rule (`schedule.next_turn`) forward from the models
resident now, so work for a resident model goes first within its tier and
priority until the first in line has been passed over for `affinity_wait`,
and each turn that needs a model brought in is charged that model's load time.
Jobs are charged for the interactive work that will come between them: each
job's turn adds the slot time interactive work (and the reloads it caused)
takes per job turn (`schedule.Interruptions`).
Start times are simulated over `concurrency` places from what this box
measured (see estimates); a model without history makes every estimate from
that point on unknown, and the view says why (for the turns after the first
unknown: what they are behind).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .estimates import Estimator
from .inventory import canonical_model_name
from .lane import Lane, Work
from .schedule import BATCH, INTERACTIVE, Scheduler
from .store import GENERATION_KINDS, Job, JobStore
from .worker import JobWorker


def iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + \
        f".{int(stamp * 1000) % 1000:03d}Z"


@dataclass
class Turn:
    kind: str
    model: str
    ident: dict[str, str]
    since: float
    tier: int = INTERACTIVE
    priority: int = 0

    @cached_property
    def name(self) -> str:
        """The canonical model name, read several times per turn in a long line."""
        return canonical_model_name(self.model) if self.model else ""


class QueueView:
    def __init__(self, chat_lane: Lane, store: JobStore, worker: JobWorker,
                 estimator: Estimator, scheduler: Scheduler) -> None:
        self._chat_lane, self._store, self._worker = chat_lane, store, worker
        self._estimator, self._scheduler = estimator, scheduler

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        holders, line = self._chat_lane.snapshot()
        running, free_at = self._running(holders, now)
        waiting = []
        turns = self._turns(line)
        for turn, position, start, unknown, loads in self._schedule(turns, holders, free_at,
                                                                    now):
            entry: dict[str, Any] = {"position": position, "kind": turn.kind,
                                     "model": turn.model, **turn.ident,
                                     "waited_seconds": round(now - turn.since, 3),
                                     "estimated_start": iso(start), "loads_model": loads}
            if unknown is not None:
                entry["estimate"] = f"unknown: {unknown}"
            waiting.append(entry)
        residency = self._scheduler.residency
        view = {"concurrency": self._chat_lane.concurrency, "running": running,
                "waiting": waiting, "resident": residency.models(),
                "resident_capacity": residency.capacity, "history": self._estimator.known()}
        if self._store.shared:  # the fleet sharing the job queue: who is up, with what
            view["hosts"] = self._store.hosts()
        return view

    def place(self, job: Job) -> tuple[int | None, str | None]:
        """A queued chat/generate job's position and estimated start, as `snapshot`
        shows them."""
        now = time.time()
        holders, line = self._chat_lane.snapshot()
        _, free_at = self._running(holders, now)
        for turn, position, start, *_ in self._schedule(self._turns(line), holders, free_at,
                                                        now):
            if turn.ident.get("job_id") == job.id:
                return position, iso(start)
        return None, None  # claimed or gone since it was read, or another host's to run

    def _running(self, holders: list[Work], now: float
                 ) -> tuple[list[dict[str, Any]], list[float | None]]:
        """What holds the slot now, and when each place frees up (None: unknown)."""
        running = []
        free_at: list[float | None] = []
        for work in holders:
            job = work.tier != INTERACTIVE
            tokens = self._worker.chunks(work.label) if job else work.chunks
            running.append({
                "kind": "job" if job else work.kind, "model": work.model,
                **({"job_id": work.label} if job else {"request_id": work.label}),
                "since": iso(work.started_at), "tokens": tokens,
            })
            estimate = self._estimator.estimate(work.model, work.resident)
            started = work.started_at or now
            free_at.append(None if estimate is None else max(now, started + estimate))
        free_at += [now] * max(0, self._chat_lane.concurrency - len(free_at))
        return running, free_at

    def _turns(self, line: list[Work]) -> list[Turn]:
        """Interactive waiters first, then queued chat/generate jobs by priority and
        arrival: the line before the scheduler reorders it."""
        turns = [Turn(w.kind, w.model, {"request_id": w.label}, w.enqueued_at)
                 for w in line if w.tier == INTERACTIVE]
        return turns + [Turn("job", q.model, {"job_id": q.id}, q.created_at, BATCH, q.priority)
                        for q in self._store.line(GENERATION_KINDS,
                                                  available=self._worker.available())]

    def _schedule(self, turns: list[Turn], holders: list[Work], free_at: list[float | None],
                  now: float) -> Iterator[tuple[Turn, int, float | None, str | None, bool]]:
        """(turn, position, estimated start, why unknown, whether it loads its model)
        for each turn, in the order the scheduler will give them the slot, simulated
        over its places; once one start is unknown, all later are."""
        behind: str | None = None  # what the first unknown start is waiting on
        estimates: dict[tuple[str, bool], float | None] = {}  # thousands of turns, few models
        residency = self._scheduler.residency
        resident = _Resident(residency.models(), residency.capacity)
        # Each job also waits for the interactive work that comes between jobs, and
        # reloads its model after it; before the first job, the interactive work in
        # sight (running or waiting) is that interruption.
        interruption = self._scheduler.interruption_per_job()
        interrupted = any(work.tier == INTERACTIVE for work in holders) or any(
            turn.tier == INTERACTIVE for turn in turns)
        for work in holders:  # what runs now is resident when its place frees
            resident.ran(canonical_model_name(work.model) if work.model else "")
        # The order is drawn lazily: each pick sees the residency and the clock the
        # turns before it left.
        for position, turn in enumerate(self._order(turns, resident, free_at, now), 1):
            start, unknown = None, None
            needs_load = not resident.ran(turn.name)
            if behind is not None:
                # Said as what it is: not this model's history, the unknown ahead.
                unknown = f"behind {behind}"
            else:
                key = (turn.model, not needs_load)
                if key not in estimates:
                    estimates[key] = self._estimator.estimate(*key)
                estimate = estimates[key]
                if estimate is None:
                    unknown = f"no history for model {turn.model} yet"
                    behind = f"a {turn.kind} for {turn.model}, which has no history yet"
                elif None in free_at:
                    unknown = behind = "a running model that has no history yet"
                else:
                    place = min(range(len(free_at)), key=lambda i: free_at[i] or 0.0)
                    start = free_at[place] or now
                    if turn.tier == BATCH:
                        start += 0.0 if interrupted else interruption.before
                        interrupted = False
                        estimate += 0.0 if needs_load else interruption.reload
                    free_at[place] = start + estimate
            yield turn, position, start, unknown, needs_load

    def _order(self, turns: list[Turn], resident: _Resident, free_at: list[float | None],
               now: float) -> Iterator[Turn]:
        """`turns` in the scheduler's order: within each run of one tier and priority,
        the first waiter for a resident model goes first, until the first in line
        has been passed over for `affinity_wait` (measured on the simulated clock)."""
        wait = self._scheduler.affinity_wait
        for _, group in itertools.groupby(turns, key=lambda t: (t.tier, t.priority)):
            pending = list(group)
            by_model: dict[str, deque[int]] = {}
            for index, turn in enumerate(pending):
                by_model.setdefault(turn.name, deque()).append(index)
            taken = [False] * len(pending)
            head, passed_since = 0, None
            for _ in range(len(pending)):
                while taken[head]:
                    head += 1
                clock = min((f for f in free_at if f is not None), default=None)
                chosen = head
                model = pending[head].name
                if wait > 0 and model and model not in resident.models and not (
                        passed_since is not None and clock is not None
                        and clock - passed_since >= wait):
                    firsts = [by_model[m][0] for m in resident.models if by_model.get(m)]
                    if firsts:
                        chosen = min(firsts)
                        passed_since = clock if passed_since is None else passed_since
                if chosen == head:
                    passed_since = None
                taken[chosen] = True
                by_model[pending[chosen].name].popleft()
                yield pending[chosen]


class _Resident:
    """The models resident as the simulated line runs: the last `capacity` run."""

    def __init__(self, models: list[str], capacity: int) -> None:
        self.models = deque(models[-capacity:])
        self._capacity = capacity

    def ran(self, model: str) -> bool:
        """Run `model`; returns whether it was resident already."""
        if not model:
            return True
        was = model in self.models
        if was:
            self.models.remove(model)
        self.models.append(model)
        while len(self.models) > self._capacity:
            self.models.popleft()
        return was
