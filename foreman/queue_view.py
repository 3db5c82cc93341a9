"""Where everyone is in line for the chat slot, and when their turn should come.

The line is what the chat slot holds (interactive requests always first)
followed by the queued chat/generate jobs in the order the workers will claim
them.  Start times are simulated over `concurrency` places from what this box
measured (see estimates); a model without history makes every estimate from
that point on unknown, and the view says why (for the turns after the first
unknown: what they are behind).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .estimates import Estimator
from .inventory import Inventory
from .lane import INTERACTIVE, Lane, Work
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
    resident: bool


class QueueView:
    def __init__(self, chat_lane: Lane, store: JobStore, worker: JobWorker, inventory: Inventory,
                 estimator: Estimator) -> None:
        self._chat_lane, self._store, self._worker = chat_lane, store, worker
        self._inventory, self._estimator = inventory, estimator

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        holders, line = self._chat_lane.snapshot()
        running, free_at = self._running(holders, now)
        waiting = []
        for turn, position, start, unknown in self._schedule(self._turns(line), free_at, now):
            entry: dict[str, Any] = {"position": position, "kind": turn.kind,
                                     "model": turn.model, **turn.ident,
                                     "waited_seconds": round(now - turn.since, 3),
                                     "estimated_start": iso(start)}
            if unknown is not None:
                entry["estimate"] = f"unknown: {unknown}"
            waiting.append(entry)
        return {"concurrency": self._chat_lane.concurrency, "running": running,
                "waiting": waiting, "history": self._estimator.known()}

    def place(self, job: Job) -> tuple[int, str | None]:
        """A queued chat/generate job's position and estimated start, as `snapshot`
        would show them, from the turns ahead of it only."""
        now = time.time()
        holders, line = self._chat_lane.snapshot()
        _, free_at = self._running(holders, now)
        own = Turn("job", job.model, {"job_id": job.id}, job.created_at,
                   self._inventory.is_loaded(job.model))
        turns = [*self._turns(line, ahead_of=job), own]
        *_, (_, position, start, _) = self._schedule(turns, free_at, now)
        return position, iso(start)

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

    def _turns(self, line: list[Work], ahead_of: Job | None = None) -> list[Turn]:
        """Interactive waiters first, then queued chat/generate jobs in claim order."""
        turns = [Turn(w.kind, w.model, {"request_id": w.label}, w.enqueued_at, w.resident)
                 for w in line if w.tier == INTERACTIVE]
        queued = self._store.line(GENERATION_KINDS, ahead_of)
        loaded = {model: self._inventory.is_loaded(model) for model in {q.model for q in queued}}
        return turns + [Turn("job", q.model, {"job_id": q.id}, q.created_at, loaded[q.model])
                        for q in queued]

    def _schedule(self, turns: list[Turn], free_at: list[float | None], now: float
                  ) -> Iterator[tuple[Turn, int, float | None, str | None]]:
        """(turn, position, estimated start, why unknown) for each turn in order,
        simulated over the slot's places; once one start is unknown, all later are."""
        behind: str | None = None  # what the first unknown start is waiting on
        estimates: dict[tuple[str, bool], float | None] = {}  # thousands of turns, few models
        for position, turn in enumerate(turns, 1):
            start, unknown = None, None
            if behind is not None:
                # Said as what it is: not this model's history, the unknown ahead.
                unknown = f"behind {behind}"
            else:
                key = (turn.model, turn.resident)
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
                    free_at[place] = start + estimate
            yield turn, position, start, unknown
