"""The durable job queue's contract, and the logic every backend shares.

`JobStore` owns what a job is and how it moves (queued -> running -> a final
state), written once in SQL both backends speak; a backend owns its
connections, its transactions, its schema and the few statements that differ
(`store_sqlite`: one file, one host; `store_postgres`: one database, a fleet of
hosts).  `open_store` picks the backend from `jobs.db`.

A job is accepted only once its row is committed durably, so a `kill -9` at any
moment loses nothing that was answered 202.  Every state change after the claim
is a compare-and-set on (id, status, attempts), so a worker whose job was
cancelled, or re-claimed after its host was lost, can never overwrite the newer
state.  Rows found `running` that no live host owns are orphans: they go back to
the queue, or fail once their attempts are spent.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

from .errors import ApiError
from .inventory import canonical_model_name

KINDS = ("chat", "generate", "embed")
GENERATION_KINDS = ("chat", "generate")  # the chat-slot lane
EMBED_KINDS = ("embed",)
FINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", *FINAL)
# How long a write waits for another writer's lock before it fails with
# StoreUnavailable (and is retried by whoever asked).
BUSY_TIMEOUT = 10.0


class StoreUnavailable(ApiError):
    """The job database cannot be written (read-only, disk full, locked too long,
    the database server unreachable)."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, f"the job store cannot accept work right now: {detail}",
                         {"Retry-After": "5"})


class StoreCorrupt(Exception):
    """The job database cannot be opened as one (a file that is not SQLite, a
    database server that refuses us, a driver that is not installed)."""


class StoreInUse(Exception):
    """Another live foreman has this job store open (under this host's name)."""


class KeyTaken(Exception):
    """A backend's transaction lost a race for a unique idempotency key."""


def model_of(request: dict[str, Any]) -> str:
    """The model a job's request names, as the `model` column stores it."""
    return str(request.get("model", ""))


def model_key(model: str) -> str:
    """The `model_key` column: the canonical name, matched against a host's models
    (so `llama3` is `llama3:latest`)."""
    return canonical_model_name(model) if model else ""


@dataclass
class Job:
    """A job as stored.  Its request and result stay JSON text: a document or a
    webhook splices them in as they are, so an embedding's thousands of numbers
    are never parsed and encoded again for each reader."""

    id: str
    seq: int
    kind: str
    model: str
    status: str
    priority: int
    request_json: str
    webhook: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    not_before: float
    attempts: int
    result_json: str | None
    error: str | None
    host: str | None = None  # the host running it, or that ran it last

    @property
    def request(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.request_json)
        return parsed

    @property
    def finished(self) -> bool:
        return self.status in FINAL


Row = Mapping[str, Any]


def _job(row: Row) -> Job:
    return Job(
        id=row["id"], seq=row["seq"], kind=row["kind"], model=row["model"],
        status=row["status"], priority=row["priority"], request_json=row["request"],
        webhook=row["webhook"], created_at=row["created_at"], started_at=row["started_at"],
        finished_at=row["finished_at"], not_before=row["not_before"],
        attempts=row["attempts"], result_json=row["result"], error=row["error"],
        host=row["host"],
    )


# Every column a Job needs, with the request and the result left unread.
_BRIEF_COLUMNS = ("seq, id, kind, model, status, priority, 'null' AS request, webhook,"
                  " created_at, started_at, finished_at, not_before, attempts,"
                  " NULL AS result, error, host")


class Queued(NamedTuple):
    """A queued job as the line needs it: no request or result to parse.  A tuple,
    since the line can be thousands of jobs long and is read on every submit."""

    id: str
    model: str
    created_at: float
    priority: int


# Rows claimed before the job given as (priority, priority, seq): the claim order.
_AHEAD_OF = "(priority > ? OR (priority = ? AND seq < ?))"


def placeholders(values: Sequence[str]) -> str:
    """`?, ?` for an `IN (...)` clause over `values`."""
    return ",".join("?" * len(values))


def _for_models(available: Sequence[str] | None) -> tuple[str, tuple[str, ...]]:
    """The WHERE clause that keeps jobs for these models (canonical names); None: all."""
    if available is None:
        return "", ()
    if not available:
        return " AND 1 = 0", ()
    return f" AND model_key IN ({placeholders(available)})", tuple(available)


def fingerprint(kind: str, request: dict[str, Any], priority: int, webhook: str | None) -> str:
    canonical = json.dumps([kind, request, priority, webhook], sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> list[Row]: ...


class Session(Protocol):
    """One transaction's connection, as the shared logic uses it: `?` placeholders,
    rows read by column name."""

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...


class JobStore:
    """The contract.  A backend provides `_transaction` (one write transaction),
    `_read` (one query, never behind a writer), `close`, `location`, and overrides
    the class attributes below where its SQL differs."""

    # Appended to a SELECT that the transaction then updates: SQLite's write
    # transaction already excludes every other writer, PostgreSQL locks the rows.
    LOCK_ROWS = ""
    # Appended to the claim's SELECT: PostgreSQL skips rows another host is
    # claiming instead of waiting for them.
    SKIP_LOCKED = ""
    # Several hosts claim from this store (leases, host names, model filters).
    shared = False
    lease_timeout = 30.0  # seconds a running job's lease lasts unrenewed (shared stores)

    def __init__(self, clock: Callable[[], float] = time.time, host: str = "") -> None:
        self._clock = clock
        self.host = host
        self._changed = threading.Condition(threading.Lock())
        self._version = 0
        # Writes that may give a worker something to claim; kept apart so that a job
        # finishing (a write between one job and the next) does not wake every idle
        # worker to look for work it cannot have brought.
        self._work = threading.Condition(threading.Lock())
        self._work_version = 0

    # -- what a backend provides -----------------------------------------------------

    @property
    def location(self) -> str:
        """Where the jobs are, for the log (no secrets)."""
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[Session]:
        raise NotImplementedError

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        raise NotImplementedError

    def _announce(self, db: Session) -> None:
        """Inside a transaction that adds work: tell other hosts (at commit)."""

    def _cancelled(self, db: Session, job_id: str) -> None:
        """Inside the transaction that cancels a running job: tell the host running it."""

    # -- the fleet: what a shared store adds (one host: nothing to do) ------------------

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        """`callback(job_id)` hears of a running job cancelled on another host."""

    def register(self, models: Iterable[str]) -> None:
        """Take this host's name among the store's hosts (StoreInUse if taken)."""

    def heartbeat(self, models: Iterable[str], running: Iterable[str]) -> set[str]:
        """This host is alive with these models: renew the leases of its jobs.  Returns
        which of the jobs it runs (`running`) are no longer its own to run (cancelled,
        or run again elsewhere after its lease ran out)."""
        return set()

    def expire_leases(self, max_attempts: int) -> tuple[int, int]:
        """Put back the jobs of hosts that stopped renewing: (requeued, failed)."""
        return 0, 0

    def fleet_models(self) -> set[str] | None:
        """The models some live host has (canonical names); None: one host."""
        return None

    def hosts(self) -> list[dict[str, Any]]:
        """The live hosts sharing the store, for /status."""
        return []

    def leave(self) -> None:
        """This host stops (its running jobs were put back)."""

    def close(self) -> None:
        raise NotImplementedError

    # -- plumbing ---------------------------------------------------------------

    @contextmanager
    def _write(self, adds_work: bool = False) -> Iterator[Session]:
        """One write transaction.  `adds_work`: it may make a job ready to claim
        (workers here and on other hosts are woken)."""
        with self._transaction() as db:
            yield db
            if adds_work:
                self._announce(db)
        self._changed_here(adds_work)

    def _changed_here(self, adds_work: bool) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()
        if adds_work:
            self._wake_workers()

    def _wake_workers(self) -> None:
        with self._work:
            self._work_version += 1
            self._work.notify_all()

    def wait_for_change(self, seen: int, timeout: float) -> int:
        """Block until any write after version `seen`, or timeout; return the version."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != seen, timeout)
            return self._version

    def wait_for_work(self, seen: int, timeout: float) -> int:
        """Block until a write after `work_version` `seen` that may have made a job ready
        (a submit, a requeue), or timeout; return the work version."""
        with self._work:
            self._work.wait_for(lambda: self._work_version != seen, timeout)
            return self._work_version

    def wake_waiters(self) -> None:
        """Wake every `wait_for_change` and `wait_for_work` caller so it can re-check its
        own stop condition."""
        with self._changed:
            self._version += 1
            self._changed.notify_all()
        self._wake_workers()

    @property
    def version(self) -> int:
        return self._version

    @property
    def work_version(self) -> int:
        return self._work_version

    # -- submitting and reading -------------------------------------------------

    def submit(self, kind: str, request: dict[str, Any], priority: int = 0,
               webhook: str | None = None, idempotency_key: str | None = None
               ) -> tuple[Job, bool]:
        """Commit a new job; returns (job, created).  A replayed key returns the
        existing job with created=False; the same key with another body is a 409.
        Keys are unique across every host on the store."""
        print_ = fingerprint(kind, request, priority, webhook)
        try:
            return self._submit(kind, request, priority, webhook, idempotency_key, print_)
        except KeyTaken:  # another host committed the same key first: replay it
            return self._submit(kind, request, priority, webhook, idempotency_key, print_)

    def _submit(self, kind: str, request: dict[str, Any], priority: int, webhook: str | None,
                idempotency_key: str | None, print_: str) -> tuple[Job, bool]:
        with self._write(adds_work=True) as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?",
                                 (idempotency_key,)).fetchone()
                if row is not None:
                    if row["fingerprint"] != print_:
                        raise ApiError(409, "this Idempotency-Key was used for a different job")
                    return _job(row), False
            job_id = uuid.uuid4().hex
            model = model_of(request)
            db.execute(
                "INSERT INTO jobs (id, kind, model, model_key, status, priority, request,"
                " webhook, idempotency_key, fingerprint, created_at)"
                " VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, kind, model, model_key(model), priority, json.dumps(request),
                 webhook, idempotency_key, print_, self._clock()),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert row is not None
        return _job(row), True

    def get(self, job_id: str) -> Job | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def position(self, job: Job) -> int | None:
        """1-based place among queued jobs of the same lane (embed, or chat/generate)."""
        if job.status != "queued":
            return None
        lane = EMBED_KINDS if job.kind in EMBED_KINDS else GENERATION_KINDS
        ahead = self._read(
            f"SELECT COUNT(*) AS ahead FROM jobs WHERE status = 'queued' AND kind IN"
            f" ({placeholders(lane)}) AND {_AHEAD_OF}",
            (*lane, job.priority, job.priority, job.seq),
        )[0]["ahead"]
        return int(ahead) + 1

    def list(self, status: str | None = None, kind: str | None = None, limit: int = 50,
             after: int | None = None, brief: bool = False) -> tuple[list[Job], int | None]:
        """Newest first; `after` is the cursor (a seq) returned by the previous page.
        Brief jobs are read without their request and result (`null` and None)."""
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if after is not None:
            where.append("seq < ?")
            args.append(after)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        columns = _BRIEF_COLUMNS if brief else "*"
        rows = self._read(f"SELECT {columns} FROM jobs {clause} ORDER BY seq DESC LIMIT ?",
                          (*args, limit + 1))
        jobs = [_job(r) for r in rows[:limit]]
        return jobs, jobs[-1].seq if len(rows) > limit else None

    def model_history(self) -> list[tuple[str, float | None, float | None, int]]:
        """The estimator's saved history: (model, generation, load, samples)."""
        return [(r["model"], r["generation"], r["load"], r["samples"])
                for r in self._read("SELECT * FROM model_history")]

    def save_model_history(self, model: str, generation: float | None, load: float | None,
                           samples: int) -> None:
        with self._write() as db:
            db.execute("INSERT INTO model_history (model, generation, load, samples)"
                       " VALUES (?, ?, ?, ?) ON CONFLICT (model) DO UPDATE SET"
                       " generation = excluded.generation, load = excluded.load,"
                       " samples = excluded.samples", (model, generation, load, samples))

    def peek(self, kinds: tuple[str, ...], available: Sequence[str] | None = None
             ) -> Job | None:
        """The job `claim` would take now (with the same `available`), without taking it."""
        where, args = _for_models(available)
        rows = self._read(f"SELECT * FROM jobs WHERE status = 'queued' AND kind IN"
                          f" ({placeholders(kinds)}){where} AND not_before <= ?"
                          " ORDER BY priority DESC, seq LIMIT 1", (*kinds, *args, self._clock()))
        return _job(rows[0]) if rows else None

    def queued_models(self, kinds: tuple[str, ...], priority: int,
                      available: Sequence[str] | None = None) -> list[str]:
        """The models of the ready jobs of these kinds at `priority`, as written."""
        where, args = _for_models(available)
        return [r["model"] for r in self._read(
            f"SELECT DISTINCT model FROM jobs WHERE status = 'queued'"
            f" AND kind IN ({placeholders(kinds)}){where} AND priority = ? AND not_before <= ?",
            (*kinds, *args, priority, self._clock()))]

    def line(self, kinds: tuple[str, ...], ahead_of: Job | None = None,
             available: Sequence[str] | None = None) -> list[Queued]:
        """Queued jobs of these kinds in the order workers will claim them; with
        `ahead_of`, only those that come before that job; with `available`, only
        those for these models (what this host can claim)."""
        where, models = _for_models(available)
        sql = (f"SELECT id, model, created_at, priority FROM jobs"
               f" WHERE status = 'queued' AND kind IN ({placeholders(kinds)}){where}")
        args: tuple[Any, ...] = (*kinds, *models)
        if ahead_of is not None:
            sql += f" AND {_AHEAD_OF}"
            args += (ahead_of.priority, ahead_of.priority, ahead_of.seq)
        return [Queued(row["id"], row["model"], row["created_at"], row["priority"])
                for row in self._read(sql + " ORDER BY priority DESC, seq", args)]

    def next_ready_at(self, kinds: tuple[str, ...]) -> float | None:
        """When the earliest queued job of these kinds may run (None: nothing queued)."""
        marks = placeholders(kinds)
        rows = self._read(
            f"SELECT MIN(not_before) AS ready_at FROM jobs WHERE status = 'queued'"
            f" AND kind IN ({marks})", kinds)
        ready_at: float | None = rows[0]["ready_at"]
        return ready_at

    # -- the worker's side --------------------------------------------------------

    def claim(self, kinds: tuple[str, ...], models: Sequence[str] = (),
              priority: int | None = None, available: Sequence[str] | None = None
              ) -> Job | None:
        """Atomically take the best ready job of these kinds and mark it running (on
        this host, under a lease where the store is shared); with `models` and
        `priority`, the first of that priority for one of those models (as written);
        with `available`, only jobs for those models (canonical names: what this
        host's target has)."""
        now = self._clock()
        where, args = f"kind IN ({placeholders(kinds)})", (*kinds,)
        if models and priority is not None:
            where += f" AND priority = ? AND model IN ({placeholders(models)})"
            args += (priority, *models)
        available_where, available_args = _for_models(available)
        where += available_where
        args += available_args
        lease, lease_args = self._lease()
        with self._write() as db:  # one statement: one round trip to a database server
            claimed = db.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?,"
                f" host = ?, lease_until = {lease} WHERE status = 'queued' AND id = ("
                f"SELECT id FROM jobs WHERE status = 'queued' AND {where} AND not_before <= ?"
                f" ORDER BY priority DESC, seq LIMIT 1{self.SKIP_LOCKED}) RETURNING *",
                (now, self.host or None, *lease_args, *args, now),
            ).fetchall()
        return _job(claimed[0]) if claimed else None

    def finish(self, job: Job, status: str, result_json: str | None = None,
               error: str | None = None) -> Job | None:
        """running -> a final state, if this attempt still owns the job: returns the
        job as finished, or None if a cancel or a newer attempt got there first."""
        finished_at = self._clock()
        with self._write() as db:
            changed = db.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ?"
                " WHERE id = ? AND status = 'running' AND attempts = ?",
                (status, result_json, error, finished_at, job.id, job.attempts),
            ).rowcount
        if changed != 1:
            return None
        return replace(job, status=status, result_json=result_json, error=error,
                       finished_at=finished_at)

    def requeue(self, job: Job, delay: float, spend_attempt: bool, error: str | None) -> bool:
        """running -> queued after `delay` seconds; a target outage does not spend an attempt."""
        with self._write(adds_work=True) as db:
            changed = db.execute(
                "UPDATE jobs SET status = 'queued', not_before = ?, error = ?, started_at = NULL,"
                " lease_until = NULL, attempts = attempts - ?"
                " WHERE id = ? AND status = 'running' AND attempts = ?",
                (self._clock() + delay, error, 0 if spend_attempt else 1, job.id, job.attempts),
            ).rowcount
        return changed == 1

    def recover_orphans(self, max_attempts: int) -> tuple[int, int]:
        """At start-up: the running rows this host left when it stopped (all of them,
        where the store has one host) were interrupted.  Returns (requeued, failed)."""
        mine, mine_args = self._orphans()
        now = self._clock()
        with self._write(adds_work=True) as db:
            failed = db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = 'interrupted:"
                " foreman stopped while the job was running, and its attempts are spent'"
                f" WHERE status = 'running' AND attempts >= ? AND {mine}",
                (now, max_attempts, *mine_args),
            ).rowcount
            requeued = db.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL, not_before = 0,"
                f" lease_until = NULL WHERE status = 'running' AND {mine}", mine_args).rowcount
        return requeued, failed

    def _orphans(self) -> tuple[str, tuple[Any, ...]]:
        """Which running rows `recover_orphans` takes back (a WHERE clause)."""
        return "1 = 1", ()

    def _lease(self) -> tuple[str, tuple[Any, ...]]:
        """The SQL value a claim writes as `lease_until`, and its arguments."""
        return "NULL", ()

    # -- the client's side ----------------------------------------------------------

    def cancel(self, job_id: str) -> tuple[Job | None, str]:
        """Returns (job after the change, what was cancelled: queued|running|final|missing)."""
        with self._write() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?" + self.LOCK_ROWS,
                             (job_id,)).fetchone()
            if row is None:
                return None, "missing"
            was = row["status"]
            if was in FINAL:
                return _job(row), "final"
            db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?,"
                       " error = 'cancelled by request' WHERE id = ?", (self._clock(), job_id))
            if was == "running":
                self._cancelled(db, job_id)
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert row is not None
        return _job(row), was

    def delete(self, job_id: str) -> str:
        """Remove a finished job.  Returns deleted|missing|unfinished."""
        with self._write() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?" + self.LOCK_ROWS,
                             (job_id,)).fetchone()
            if row is None:
                return "missing"
            if row["status"] not in FINAL:
                return "unfinished"
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return "deleted"

    def prune(self, older_than: float) -> int:
        with self._write() as db:
            return db.execute("DELETE FROM jobs WHERE finished_at IS NOT NULL AND"
                              " finished_at < ?", (self._clock() - older_than,)).rowcount

    def counts(self) -> dict[str, int]:
        rows = self._read("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({r["status"]: r["n"] for r in rows})
        return counts


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(location: str, *, exclusive: bool = False, host: str = "",
               lease_timeout: float = 30.0, clock: Callable[[], float] = time.time) -> JobStore:
    """The store `jobs.db` names: a `postgresql://` URL (a fleet's shared queue; the
    driver is imported only then), or a SQLite file."""
    if location.startswith(POSTGRES_SCHEMES):
        try:
            from .store_postgres import PostgresStore
        except ImportError as exc:
            raise StoreCorrupt(
                f"jobs.db is a PostgreSQL URL, but its driver cannot be imported ({exc}):"
                " pip install -r requirements-postgres.txt") from None
        return PostgresStore(location, host=host, lease_timeout=lease_timeout, clock=clock)
    from .store_sqlite import SqliteStore
    return SqliteStore(location, clock, exclusive)  # one host: no host names to keep
