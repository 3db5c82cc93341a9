"""Runs queued jobs against the target, as soon as the GPU is free and the target is up.

Workers queue in a lane behind every interactive request (generation workers
in the chat slot, one per place; embed workers in the embed lane) and claim
the best job only once they hold a place, so the job that runs is the best
one at that moment and the gap from one job to the next is a claim, not a poll.

Every exception on a job's path ends in a state change.  A target 4xx fails
the job with the target's error.  A target that cannot be reached at all puts
the job back without spending an attempt, and workers wait for the inventory
to see the target again.  Anything else once the target took the work (a
5xx, a timeout, a dropped connection, an answer that is not Ollama's, a fault
of foreman's own) spends an attempt: retried with backoff until
`max_attempts`, then failed with an error that says what happened.  A
generation runs under the watchdog's clocks; while a stall degrades foreman,
workers wait without spending attempts.  A cancelled running job has its
upstream request aborted.  Finished jobs go to the webhook notifier.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import (
    TargetBadAnswer,
    TargetHTTPError,
    TargetLost,
    TargetUnreachable,
    describe_failure,
)
from .inventory import Inventory, canonical_model_name
from .lane import Lane, WaitCancelled, Work
from .metrics import Metrics
from .schedule import BATCH, Candidate
from .store import EMBED_KINDS, GENERATION_KINDS, Job, JobStore, StoreUnavailable
from .target import AbortSignal, TargetClient
from .watchdog import Watchdog

log = logging.getLogger("foreman.jobs")

OUTAGE_RETRY_SECONDS = 1.0
MAINTENANCE_SECONDS = 60.0


def retry_delay(attempts: int) -> float:
    """Backoff after a failed attempt: 2 s, 4 s, 8 s ... capped at a minute."""
    return float(min(60, 2 ** attempts))


@dataclass
class Running:
    job: Job
    abort: AbortSignal
    pieces: list[str] = field(default_factory=list)  # one per stream chunk


class JobWorker:
    def __init__(
        self,
        store: JobStore,
        client: TargetClient,
        chat_lane: Lane,
        embed_lane: Lane,
        inventory: Inventory,
        watchdog: Watchdog,
        notify: Callable[[Job], None],
        metrics: Metrics,
        *,
        generation_workers: int = 1,
        embed_workers: int = 2,
        max_attempts: int = 3,
        retention: float = 7 * 86400.0,
    ) -> None:
        self._store, self._client = store, client
        self._inventory, self._notify, self._metrics = inventory, notify, metrics
        self._watchdog = watchdog
        self._max_attempts, self._retention = max_attempts, retention
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, Running] = {}
        self._threads = [
            *(threading.Thread(target=self._loop, args=(GENERATION_KINDS, chat_lane),
                               name=f"foreman-job-gen-{i}", daemon=True)
              for i in range(generation_workers)),
            *(threading.Thread(target=self._loop, args=(EMBED_KINDS, embed_lane),
                               name=f"foreman-job-embed-{i}", daemon=True)
              for i in range(embed_workers)),
            threading.Thread(target=self._maintain, name="foreman-job-maint", daemon=True),
        ]
        if store.shared:
            self._threads.append(threading.Thread(target=self._keep_leases,
                                                  name="foreman-job-leases", daemon=True))

    def start(self) -> None:
        requeued, failed = self._store.recover_orphans(self._max_attempts)
        if requeued or failed:
            log.warning("recovered jobs interrupted by a restart: %d requeued, %d failed",
                        requeued, failed)
        self._store.on_cancel(self.abort)  # a job cancelled on another host, run here
        for thread in self._threads:
            thread.start()

    def stop_claiming(self) -> None:
        self._stop.set()
        self._store.wake_waiters()
        self._inventory.wake_waiters()

    def stop(self, timeout: float) -> None:
        """Stop claiming, give running jobs `timeout` seconds, then abort and requeue them."""
        self.stop_claiming()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            running = list(self._running.values())
        for item in running:
            item.abort.abort()
        for thread in self._threads:
            thread.join(5)
        try:
            self._store.leave()
        except StoreUnavailable as exc:
            log.error("could not leave the shared job store: %s", exc.message)

    # -- what the API shows -----------------------------------------------------

    def progress(self, job_id: str) -> str | None:
        """The text generated so far by a running chat/generate job."""
        with self._lock:
            item = self._running.get(job_id)
            return "".join(item.pieces) if item is not None else None

    def running_count(self) -> int:
        """Jobs this worker runs now."""
        with self._lock:
            return len(self._running)

    def chunks(self, job_id: str) -> int:
        """Stream chunks a running job has received so far."""
        with self._lock:
            item = self._running.get(job_id)
            return len(item.pieces) if item is not None else 0

    def abort(self, job_id: str) -> bool:
        """Cut a running job's upstream request (after the store marked it cancelled)."""
        with self._lock:
            item = self._running.get(job_id)
        if item is None:
            return False
        item.abort.abort()
        return True

    # -- the loops ----------------------------------------------------------------

    def _wait(self, seen: int, timeout: float) -> None:
        if not self._stop.is_set():
            self._store.wait_for_work(seen, timeout)

    def _loop(self, kinds: tuple[str, ...], lane: Lane) -> None:
        while not self._stop.is_set():
            try:
                self._step(kinds, lane)
            except StoreUnavailable as exc:
                log.error("job store unavailable, retrying: %s", exc.message)
                self._stop.wait(OUTAGE_RETRY_SECONDS)
            except Exception:
                log.exception("job worker error")
                self._stop.wait(OUTAGE_RETRY_SECONDS)

    def _step(self, kinds: tuple[str, ...], lane: Lane) -> None:
        seen = self._store.work_version
        if self._inventory.snapshot.degraded and self._inventory.snapshot.last_attempt:
            # Jobs wait for the target instead of failing against it.
            self._inventory.wait_for(lambda s: not s.degraded or self._stop.is_set(), 1.0)
            return
        if self._watchdog.stall is not None:
            # A stalled target answers its tags but not its generations: wait for a
            # generation (or the watchdog's probe) to complete again.
            self._watchdog.wait_until_answering(1.0)
            return
        available = self.available()
        head = self._store.peek(kinds, available)
        if head is None:
            ready_at = self._store.next_ready_at(kinds)
            wait = 1.0 if ready_at is None else max(0.0, min(1.0, ready_at - time.time()))
            self._wait(seen, wait)
            return
        work = Work(kind="job", model=head.model, tier=BATCH, priority=head.priority,
                    label=head.id, resident=self._inventory.is_loaded(head.model))
        try:
            ticket = lane.acquire(work)
        except WaitCancelled:
            return  # shutting down
        try:
            job = self._claim(kinds, lane, head, available) if not self._stop.is_set() else None
            if job is not None:
                work.label, work.model = job.id, job.model
                work.resident = self._inventory.is_loaded(job.model)
                work.answered = self._run(job, work)
        finally:
            ticket.release()

    def available(self) -> list[str] | None:
        """The models this host may claim jobs for: with a shared store, those its own
        target has (other hosts run the rest); with its own store, any."""
        if not self._store.shared:
            return None
        return sorted(self._inventory.snapshot.names)

    def _claim(self, kinds: tuple[str, ...], lane: Lane, head: Job,
               available: list[str] | None) -> Job | None:
        """The next job: the first in line (`head`, as peeked before the turn came), or
        one for a resident model when the chat slot's scheduler prefers it (jobs of
        one model then run together)."""
        store = self._store
        scheduler = lane.scheduler
        model = canonical_model_name(head.model)
        if scheduler is None or model in scheduler.residency.models():
            # The usual case inside a group: no reorder.
            return store.claim(kinds, available=available)
        head = store.peek(kinds, available) or head  # priorities may have changed meanwhile
        model = canonical_model_name(head.model)
        models, reason = scheduler.preferred(
            Candidate(head.id, BATCH, head.priority, model),
            store.queued_models(kinds, head.priority, available))
        job = store.claim(kinds, models, head.priority, available) if models else None
        if job is None:
            job = store.claim(kinds, available=available)
        elif job.id != head.id:
            log.debug("job %s claimed before job %s: %s", job.id, head.id, reason)
        if job is not None:
            scheduler.forget(job.id)
        return job

    def _keep_leases(self) -> None:
        """With a shared store: renew this host's leases (a third of their length
        apart, so two missed renewals still keep them), say which models it has (at
        once when they change), and put back the jobs of hosts that stopped renewing
        theirs."""
        interval = self._store.lease_timeout / 3
        said: frozenset[str] | None = None
        renewed_at = -interval
        renewed_wall = time.time()  # the wall clock counts a sleep; the monotonic may not
        while not self._stop.is_set():
            if time.time() - renewed_wall > 2 * interval:
                # Asleep, or cut off from the store: before another host may take them
                # back, stop running what this host can no longer say it runs.
                with self._lock:
                    stranded = list(self._running)
                for job_id in stranded:
                    log.warning("job %s: this host's lease may have run out: cut", job_id)
                    self.abort(job_id)
            models = self._inventory.snapshot.names
            if models != said or time.monotonic() - renewed_at >= interval:
                try:
                    with self._lock:
                        running = list(self._running)
                    for job_id in self._store.heartbeat(models, running):
                        # A cancel whose announcement was missed, or a lease that ran
                        # out (this host was asleep) and another host's run since.
                        log.warning("job %s is no longer this host's to run: cut", job_id)
                        self.abort(job_id)
                    said, renewed_at = frozenset(models), time.monotonic()
                    renewed_wall = time.time()
                    requeued, failed = self._store.expire_leases(self._max_attempts)
                    if requeued or failed:
                        log.warning("jobs of a host that stopped renewing its leases:"
                                    " %d requeued, %d failed", requeued, failed)
                except StoreUnavailable as exc:
                    log.error("job leases not renewed: %s", exc.message)
            # Until the next renewal is due, or the target's models change.
            self._inventory.wait_for(lambda snapshot, said=said: snapshot.names != said
                                     or self._stop.is_set(), min(1.0, interval))

    def _maintain(self) -> None:
        while True:
            try:
                pruned = self._store.prune(self._retention)
                if pruned:
                    log.info("pruned %d finished jobs older than the retention", pruned)
            except StoreUnavailable as exc:
                log.error("job pruning failed: %s", exc.message)
            if self._stop.wait(MAINTENANCE_SECONDS):
                return

    # -- one job ------------------------------------------------------------------

    def _run(self, job: Job, work: Work) -> bool:
        """Run one claimed job to a new state; returns whether the target answered it
        (and leaves its final message in `work`, for the estimator)."""
        item = Running(job, AbortSignal(watched=job.kind in GENERATION_KINDS))
        with self._lock:
            self._running[job.id] = item
        started = time.monotonic()
        try:
            result_json = (self._generate(item, work) if job.kind in GENERATION_KINDS
                           else self._embed(item))
        except Exception as exc:  # every way out of a run ends in a state change
            self._after_failure(item, exc)
            return False
        else:
            if job.kind in GENERATION_KINDS:
                self._watchdog.ended(answered=True)
            self._record(job, "succeeded", lambda: self._finish(job, "succeeded",
                                                                result_json=result_json))
            return True
        finally:
            self._metrics.observe_job_run(time.monotonic() - started)
            self._metrics.add_chunks(len(item.pieces))
            with self._lock:
                self._running.pop(job.id, None)

    def _after_failure(self, item: Running, exc: Exception) -> None:
        job = item.job
        if item.abort.aborted and not item.abort.stalled:
            if not self._stop.is_set():
                return  # cancelled: the store already says so
            # Cut by the shutdown: the next start runs it again, at no cost.
            self._record(job, "queued", lambda: self._store.requeue(
                job, 0.0, spend_attempt=False, error="interrupted by a shutdown"))
            return
        if isinstance(exc, TargetUnreachable):
            self._inventory.poll_soon()
            log.info("job %s waits for the target: %s", job.id, exc)
            self._record(job, "queued", lambda: self._store.requeue(
                job, OUTAGE_RETRY_SECONDS, spend_attempt=False, error=str(exc)))
            return
        if isinstance(exc, TargetHTTPError) and exc.status < 500:
            self._record(job, "failed", lambda: self._finish(job, "failed", error=exc.message))
            return
        error = describe_failure(exc)[1]
        if not isinstance(exc, (TargetHTTPError, TargetLost, TargetBadAnswer)):
            log.error("job %s failed inside foreman", job.id, exc_info=exc)
        if job.attempts >= self._max_attempts:
            final = f"{error} (after {job.attempts} attempts)"
            self._record(job, "failed", lambda: self._finish(job, "failed", error=final))
            return
        log.info("job %s attempt %d failed (%s); retrying", job.id, job.attempts, error)
        self._record(job, "queued", lambda: self._store.requeue(
            job, retry_delay(job.attempts), spend_attempt=True, error=error))

    def _finish(self, job: Job, status: str, result_json: str | None = None,
                error: str | None = None) -> None:
        finished = self._store.finish(job, status, result_json, error)
        if finished is not None:
            self._notify(finished)

    def _record(self, job: Job, status: str, write: Callable[[], Any]) -> None:
        """Write a job's new state, retrying while the store cannot be written: a
        result exists only in memory, and a job left `running` would wait for a
        restart.  Only a shutdown ends the retries (the next start recovers it)."""
        delay = OUTAGE_RETRY_SECONDS
        while True:
            try:
                write()
                return
            except StoreUnavailable as exc:
                log.error("cannot record job %s as %s yet: %s", job.id, status, exc.message)
                if self._stop.wait(delay):
                    return
                delay = min(30.0, delay * 2)

    def _embed(self, item: Running) -> str:
        raw, answer = self._client.call("POST", "/api/embed", item.job.request,
                                        abort=item.abort)
        if json.detect_encoding(raw) == "utf-8":
            with contextlib.suppress(UnicodeDecodeError):  # an encoded lone surrogate
                return raw.decode()  # kept as Ollama sent it: it parsed, so it is JSON
        return json.dumps(answer)  # documents splice it, so it must be plain UTF-8 JSON

    def _generate(self, item: Running, work: Work) -> str:
        job = item.job
        body = json.dumps({**job.request, "stream": True}).encode()
        upstream = self._watchdog.open(f"/api/{job.kind}", body, job.model, item.abort)
        try:
            if upstream.status != 200:
                raise TargetHTTPError(upstream.status, upstream.read(), upstream.content_type)
            final: dict[str, Any] | None = None
            assembled = _Assembly(job.kind)
            for line in upstream.lines():
                chunk = _stream_chunk(line)
                if "error" in chunk:
                    raise TargetHTTPError(500, line, "application/json")
                piece = assembled.add(chunk)
                with self._lock:
                    item.pieces.append(piece)
                if chunk.get("done"):
                    final, work.final = chunk, line
            if final is None:
                raise TargetLost("the stream ended before its final message")
            return json.dumps(assembled.result(final))
        finally:
            upstream.close()


def _stream_chunk(line: bytes) -> dict[str, Any]:
    """One NDJSON line of a generation, or TargetBadAnswer if it is not an object."""
    try:
        chunk = json.loads(line)
    except ValueError:  # UnicodeDecodeError included
        raise TargetBadAnswer(f"a stream line that is not JSON: {line[:80]!r}") from None
    if not isinstance(chunk, dict):
        raise TargetBadAnswer(f"a stream line that is not a JSON object: {line[:80]!r}")
    return chunk


class _Assembly:
    """Builds the answer a non-streaming call would have returned, from stream chunks."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._text: list[str] = []
        self._thinking: list[str] = []
        self._tool_calls: list[Any] = []

    def add(self, chunk: dict[str, Any]) -> str:
        part = (chunk.get("message") or {}) if self._kind == "chat" else chunk
        text = part.get("content" if self._kind == "chat" else "response") or ""
        self._text.append(text)
        self._thinking.append(part.get("thinking") or "")
        self._tool_calls.extend(part.get("tool_calls") or [])
        return text

    def result(self, final: dict[str, Any]) -> dict[str, Any]:
        result = dict(final)
        text, thinking = "".join(self._text), "".join(self._thinking)
        if self._kind == "chat":
            message = {**(final.get("message") or {}), "role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if self._tool_calls:
                message["tool_calls"] = self._tool_calls
            result["message"] = message
        else:
            result["response"] = text
            if thinking:
                result["thinking"] = thinking
        return result
