"""Where everyone is in line for the chat slot, and when their turn should come.

The line is what the chat slot holds (interactive requests always first)
followed by the queued chat/generate jobs in the order the workers will claim
them.  Start times are simulated over `concurrency` places from what this box
measured (see estimates); a model without history makes every estimate from
that point on unknown, and the view says why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .estimates import Estimator
from .inventory import Inventory
from .slot import INTERACTIVE, ChatSlot
from .store import GENERATION_KINDS, JobStore
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
    def __init__(self, slot: ChatSlot, store: JobStore, worker: JobWorker, inventory: Inventory,
                 estimator: Estimator) -> None:
        self._slot, self._store, self._worker = slot, store, worker
        self._inventory, self._estimator = inventory, estimator

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        holders, line = self._slot.snapshot()
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
        free_at += [now] * max(0, self._slot.concurrency - len(free_at))
        turns = [Turn(w.kind, w.model, {"request_id": w.label}, w.enqueued_at, w.resident)
                 for w in line if w.tier == INTERACTIVE]
        turns += [Turn("job", j.model, {"job_id": j.id}, j.created_at,
                       self._inventory.is_loaded(j.model))
                  for j in self._store.queued(GENERATION_KINDS)]
        waiting, unknown = [], None
        for position, turn in enumerate(turns, 1):
            entry: dict[str, Any] = {"position": position, "kind": turn.kind,
                                     "model": turn.model, **turn.ident,
                                     "waited_seconds": round(now - turn.since, 3)}
            estimate = self._estimator.estimate(turn.model, turn.resident)
            if unknown is None and (estimate is None or None in free_at):
                unknown = (f"no history for model {turn.model} yet" if estimate is None
                           else "no history yet for a model that is running")
            if unknown is None:
                place = min(range(len(free_at)), key=lambda i: free_at[i] or 0.0)
                start = free_at[place] or now
                free_at[place] = start + (estimate or 0.0)
                entry["estimated_start"] = iso(start)
            else:
                entry["estimated_start"] = None
                entry["estimate"] = f"unknown: {unknown}"
            waiting.append(entry)
        return {"concurrency": self._slot.concurrency, "running": running,
                "waiting": waiting, "history": self._estimator.known()}
