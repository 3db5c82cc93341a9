"""The durable job queue: one SQLite file, one writer connection, explicit transactions.

A job is accepted only once its row is committed with `synchronous=FULL`, so
a `kill -9` at any moment loses nothing that was answered 202.  Every write
runs in `BEGIN IMMEDIATE` on the one writer connection, behind one lock;
reads run on connections of their own, so in WAL mode they never wait behind a
writer (ours, or another process holding the database's write lock).  Every
state change after the claim is a compare-and-set on (id, status, attempts),
so a worker whose job was cancelled, or re-claimed after a restart, can never
overwrite the newer state.  A daemon opens its store exclusively (an OS lock
on `<db>.lock` that dies with the process), so rows found `running` when it
opens are orphans of a crash: they go back to the queue, or fail once their
attempts are spent.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from .errors import ApiError

KINDS = ("chat", "generate", "embed")
GENERATION_KINDS = ("chat", "generate")  # the chat-slot lane
EMBED_KINDS = ("embed",)
FINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", *FINAL)
# How long a write waits for another process's write lock before it fails
# with StoreUnavailable (and is retried by whoever asked).
BUSY_TIMEOUT = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    request TEXT NOT NULL,
    webhook TEXT,
    idempotency_key TEXT UNIQUE,
    fingerprint TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    not_before REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_line ON jobs (status, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS model_history (
    model TEXT PRIMARY KEY,
    generation REAL,
    load REAL,
    samples INTEGER NOT NULL
);
"""


class StoreUnavailable(ApiError):
    """The job database cannot be written (read-only, disk full, locked too long)."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, f"the job store cannot accept work right now: {detail}",
                         {"Retry-After": "5"})


class StoreCorrupt(Exception):
    """The job database file exists but is not a usable SQLite database."""


class StoreInUse(Exception):
    """Another live foreman has this job store open."""


def _lock_exclusively(path: str) -> int:
    """Hold `<path>.lock` with an OS lock for as long as the returned descriptor is
    open; the OS drops it when the process dies, `kill -9` included, so a stale
    lock cannot exist.  The file is left in place: removing it would let two
    daemons lock two different files of the same name."""
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreCorrupt(f"{path}: cannot open the job database's lock file:"
                           f" {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StoreInUse(f"{path}: the job store is in use by another foreman (pid {holder});"
                         " run one daemon per job store") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _model_of(request: dict[str, Any]) -> str:
    """The model a job's request names, as the `model` column stores it."""
    return str(request.get("model", ""))


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

    @property
    def request(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.request_json)
        return parsed

    @property
    def finished(self) -> bool:
        return self.status in FINAL


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], seq=row["seq"], kind=row["kind"], model=row["model"],
        status=row["status"], priority=row["priority"], request_json=row["request"],
        webhook=row["webhook"], created_at=row["created_at"], started_at=row["started_at"],
        finished_at=row["finished_at"], not_before=row["not_before"],
        attempts=row["attempts"], result_json=row["result"], error=row["error"],
    )


# Every column a Job needs, with the request and the result left unread.
_BRIEF_COLUMNS = ("seq, id, kind, model, status, priority, 'null' AS request, webhook,"
                  " created_at, started_at, finished_at, not_before, attempts,"
                  " NULL AS result, error")


class Queued(NamedTuple):
    """A queued job as the line needs it: no request or result to parse.  A tuple,
    since the line can be thousands of jobs long and is read on every submit."""

    id: str
    model: str
    created_at: float
    priority: int


# Rows claimed before the job given as (priority, priority, seq): the claim order.
_AHEAD_OF = "(priority > ? OR (priority = ? AND seq < ?))"


def _placeholders(values: tuple[str, ...]) -> str:
    """`?, ?` for an `IN (...)` clause over `values`."""
    return ",".join("?" * len(values))


def fingerprint(kind: str, request: dict[str, Any], priority: int, webhook: str | None) -> str:
    canonical = json.dumps([kind, request, priority, webhook], sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _add_model_column(db: sqlite3.Connection) -> None:
    """Databases written before jobs had a `model` column get one, filled in from
    each job's request, so the line can be read without parsing requests."""
    if any(column["name"] == "model" for column in db.execute("PRAGMA table_info(jobs)")):
        return
    db.execute("BEGIN IMMEDIATE")
    db.execute("ALTER TABLE jobs ADD COLUMN model TEXT NOT NULL DEFAULT ''")
    db.executemany("UPDATE jobs SET model = ? WHERE seq = ?", (
        (_model_of(json.loads(row["request"])), row["seq"])
        for row in db.execute("SELECT seq, request FROM jobs").fetchall()))
    db.execute("COMMIT")


class JobStore:
    def __init__(self, path: str, clock: Callable[[], float] = time.time,
                 exclusive: bool = False) -> None:
        """`exclusive`: this process owns the store (a daemon); another owner makes
        this raise StoreInUse."""
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(threading.Lock())
        self._version = 0
        # Writes that may give a worker something to claim; kept apart so that a job
        # finishing (a write between one job and the next) does not wake every idle
        # worker to look for work it cannot have brought.
        self._work = threading.Condition(threading.Lock())
        self._work_version = 0
        if exclusive and not path.startswith("file:"):
            folder = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(folder, exist_ok=True)  # the per-user data folder, at first
            except OSError as exc:
                raise StoreCorrupt(f"{path}: cannot create its folder: {exc.strerror}") from None
        self._owner_fd = _lock_exclusively(path) if exclusive else None
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        try:
            self._db = self._connect()
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            if self._db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise StoreCorrupt(f"{path}: the job database failed its integrity check")
            self._db.executescript(_SCHEMA)
            _add_model_column(self._db)
        except sqlite3.DatabaseError as exc:
            self._release_ownership()
            raise StoreCorrupt(f"{path}: cannot open the job database: {exc}") from None

    # -- plumbing ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=BUSY_TIMEOUT, uri=self.path.startswith("file:"))
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        return db

    def _release_ownership(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None

    @contextmanager
    def _write(self, adds_work: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; an OS-level failure becomes StoreUnavailable.
        `adds_work`: it may make a job ready to claim (workers are woken)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(str(exc)) from None
        with self._changed:
            self._version += 1
            self._changed.notify_all()
        if adds_work:
            self._wake_workers()

    def _wake_workers(self) -> None:
        with self._work:
            self._work_version += 1
            self._work.notify_all()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """One query on a reader connection of its own: never behind the write lock."""
        try:
            db = self._readers.get_nowait()
        except queue.Empty:
            try:
                db = self._connect()
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(str(exc)) from None
            with self._lock:
                self._all_readers.append(db)
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(str(exc)) from None
        finally:
            self._readers.put(db)

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

    def close(self) -> None:
        with self._lock:
            self._db.close()
            for reader in self._all_readers:
                reader.close()
            self._release_ownership()

    # -- submitting and reading -------------------------------------------------

    def submit(self, kind: str, request: dict[str, Any], priority: int = 0,
               webhook: str | None = None, idempotency_key: str | None = None
               ) -> tuple[Job, bool]:
        """Commit a new job; returns (job, created).  A replayed key returns the
        existing job with created=False; the same key with another body is a 409."""
        print_ = fingerprint(kind, request, priority, webhook)
        with self._write(adds_work=True) as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?",
                                 (idempotency_key,)).fetchone()
                if row is not None:
                    if row["fingerprint"] != print_:
                        raise ApiError(409, "this Idempotency-Key was used for a different job")
                    return _job(row), False
            job_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO jobs (id, kind, model, status, priority, request, webhook,"
                " idempotency_key, fingerprint, created_at)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, kind, _model_of(request), priority, json.dumps(request),
                 webhook, idempotency_key, print_, self._clock()),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
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
            f"SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND kind IN"
            f" ({_placeholders(lane)}) AND {_AHEAD_OF}",
            (*lane, job.priority, job.priority, job.seq),
        )[0][0]
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

    def peek(self, kinds: tuple[str, ...]) -> Job | None:
        """The job `claim` would take now, without taking it."""
        marks = _placeholders(kinds)
        rows = self._read(f"SELECT * FROM jobs WHERE status = 'queued' AND kind IN ({marks})"
                          " AND not_before <= ? ORDER BY priority DESC, seq LIMIT 1",
                          (*kinds, self._clock()))
        return _job(rows[0]) if rows else None

    def queued_models(self, kinds: tuple[str, ...], priority: int) -> list[str]:
        """The models of the ready jobs of these kinds at `priority`, as written."""
        return [r["model"] for r in self._read(
            f"SELECT DISTINCT model FROM jobs WHERE status = 'queued'"
            f" AND kind IN ({_placeholders(kinds)}) AND priority = ? AND not_before <= ?",
            (*kinds, priority, self._clock()))]

    def line(self, kinds: tuple[str, ...], ahead_of: Job | None = None) -> list[Queued]:
        """Queued jobs of these kinds in the order workers will claim them; with
        `ahead_of`, only those that come before that job."""
        sql = (f"SELECT id, model, created_at, priority FROM jobs"
               f" WHERE status = 'queued' AND kind IN ({_placeholders(kinds)})")
        args: tuple[Any, ...] = kinds
        if ahead_of is not None:
            sql += f" AND {_AHEAD_OF}"
            args += (ahead_of.priority, ahead_of.priority, ahead_of.seq)
        return [Queued(*row) for row in self._read(sql + " ORDER BY priority DESC, seq", args)]

    def next_ready_at(self, kinds: tuple[str, ...]) -> float | None:
        """When the earliest queued job of these kinds may run (None: nothing queued)."""
        marks = _placeholders(kinds)
        rows = self._read(
            f"SELECT MIN(not_before) FROM jobs WHERE status = 'queued' AND kind IN ({marks})",
            kinds)
        return rows[0][0]

    # -- the worker's side --------------------------------------------------------

    def claim(self, kinds: tuple[str, ...], models: Sequence[str] = (),
              priority: int | None = None) -> Job | None:
        """Atomically take the best ready job of these kinds and mark it running; with
        `models` and `priority`, the first of that priority for one of those models."""
        now = self._clock()
        where, args = f"kind IN ({_placeholders(kinds)})", (*kinds,)
        if models and priority is not None:
            where += f" AND priority = ? AND model IN ({_placeholders(models)})"
            args += (priority, *models)
        with self._write() as db:
            row = db.execute(
                f"SELECT id FROM jobs WHERE status = 'queued' AND {where}"
                " AND not_before <= ? ORDER BY priority DESC, seq LIMIT 1", (*args, now),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', attempts = attempts + 1,"
                       " started_at = ? WHERE id = ? AND status = 'queued'", (now, row["id"]))
            claimed = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return _job(claimed)

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
                " attempts = attempts - ? WHERE id = ? AND status = 'running' AND attempts = ?",
                (self._clock() + delay, error, 0 if spend_attempt else 1, job.id, job.attempts),
            ).rowcount
        return changed == 1

    def recover_orphans(self, max_attempts: int) -> tuple[int, int]:
        """At start-up: running rows were interrupted by a crash.  Returns (requeued, failed)."""
        now = self._clock()
        with self._write(adds_work=True) as db:
            failed = db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = 'interrupted:"
                " foreman stopped while the job was running, and its attempts are spent'"
                " WHERE status = 'running' AND attempts >= ?", (now, max_attempts),
            ).rowcount
            requeued = db.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL, not_before = 0"
                " WHERE status = 'running'").rowcount
        return requeued, failed

    # -- the client's side ----------------------------------------------------------

    def cancel(self, job_id: str) -> tuple[Job | None, str]:
        """Returns (job after the change, what was cancelled: queued|running|final|missing)."""
        with self._write() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None, "missing"
            was = row["status"]
            if was in FINAL:
                return _job(row), "final"
            db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?,"
                       " error = 'cancelled by request' WHERE id = ?", (self._clock(), job_id))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row), was

    def delete(self, job_id: str) -> str:
        """Remove a finished job.  Returns deleted|missing|unfinished."""
        with self._write() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
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
        rows = self._read("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({r[0]: r[1] for r in rows})
        return counts
