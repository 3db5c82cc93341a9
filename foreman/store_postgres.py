"""The job store in PostgreSQL: one queue shared by a fleet of hosts.

Imported only when `jobs.db` is a `postgresql://` URL (the driver, psycopg 3,
is in requirements-postgres.txt).  Each host claims with `FOR UPDATE SKIP
LOCKED`, so two hosts never take one job, and only jobs for models its own
target has.  A running job carries a lease its host renews; when a host stops
renewing (killed, asleep, unplugged), any other host puts the job back once the
lease has run out, spending the attempt the lost run took.  Lease times come
from the database's clock, so the hosts' clocks cannot matter.  New work and
cancellations are announced with `NOTIFY`, and every host `LISTEN`s, so idle
hosts wake at once and a running job cancelled elsewhere is cut here.  A host
registers its name; a second live host with the same name is refused.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import errors as pg_errors

from .config import redact_url
from .store import (
    BUSY_TIMEOUT,
    JobStore,
    KeyTaken,
    Row,
    Session,
    StoreCorrupt,
    StoreInUse,
    StoreUnavailable,
    placeholders,
)

log = logging.getLogger("foreman.store")

CHANNEL = "foreman_jobs"
_SCHEMA_LOCK = 7_362_011  # an advisory lock: two hosts starting at once create it once
_NOW = "extract(epoch from clock_timestamp())"  # the database's clock, in seconds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    model_key TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    request TEXT NOT NULL,
    webhook TEXT,
    idempotency_key TEXT UNIQUE,
    fingerprint TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    not_before DOUBLE PRECISION NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    host TEXT,
    lease_until DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS jobs_line ON jobs (status, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_leases ON jobs (lease_until) WHERE status = 'running';
CREATE TABLE IF NOT EXISTS model_history (
    host TEXT NOT NULL,
    model TEXT NOT NULL,
    generation DOUBLE PRECISION,
    load DOUBLE PRECISION,
    samples INTEGER NOT NULL,
    PRIMARY KEY (host, model)
);
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    seen_at DOUBLE PRECISION NOT NULL,
    models TEXT NOT NULL DEFAULT '[]',
    machine TEXT NOT NULL DEFAULT '',
    pid INTEGER NOT NULL DEFAULT 0
);
"""

_PLACEHOLDER = re.compile(r"\?")


def _rows(cursor: psycopg.Cursor[Any]) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """Rows read by column name, as the shared logic reads SQLite's rows."""
    names = [column.name for column in cursor.description or ()]
    return lambda values: dict(zip(names, values, strict=True))


class _Session:
    """A connection as the shared logic speaks to it: `?` placeholders."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection
        self._texts: dict[str, str] = {}

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        text = self._texts.get(sql)
        if text is None:
            text = self._texts[sql] = _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))
        return self.connection.execute(text, tuple(args))  # type: ignore[arg-type]


class PostgresStore(JobStore):
    LOCK_ROWS = " FOR UPDATE"
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    shared = True

    def __init__(self, url: str, host: str, lease_timeout: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock, host)
        self.url = url
        self.lease_timeout = lease_timeout
        self._lock = threading.Lock()
        self._readers: queue.SimpleQueue[_Session] = queue.SimpleQueue()
        self._writer: _Session | None = None
        self._closing = threading.Event()
        self._on_cancel: Callable[[str], None] = lambda job_id: None
        self._fleet_models: tuple[float, set[str]] = (-1e9, set())
        try:
            with self._transaction() as db:
                db.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
        except StoreUnavailable as exc:
            raise StoreCorrupt(f"{redact_url(url)}: cannot open the job database: {exc.message}"
                               ) from None
        # Own announcements come back to our listener too: they carry this mark.
        self._mark = uuid.uuid4().hex[:12]
        self._listening = self._subscribe()
        self._listener = threading.Thread(target=self._listen, name="foreman-store-listen",
                                          daemon=True)
        self._listener.start()

    @property
    def location(self) -> str:
        return redact_url(self.url)

    # -- connections ----------------------------------------------------------------

    def _connect(self, autocommit: bool) -> psycopg.Connection[Any]:
        try:
            connection = psycopg.connect(self.url, autocommit=autocommit,
                                         connect_timeout=int(BUSY_TIMEOUT))
        except psycopg.Error as exc:
            raise StoreUnavailable(_said(exc, self.url)) from None
        connection.row_factory = _rows  # type: ignore[assignment]
        return connection

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._lock:
            if self._writer is None or self._writer.connection.closed:
                self._writer = _Session(self._connect(autocommit=False))
            writer = self._writer
            try:
                with writer.connection.transaction():
                    yield writer  # type: ignore[misc]
            except pg_errors.UniqueViolation:
                raise KeyTaken() from None
            except psycopg.OperationalError as exc:
                writer.connection.close()  # a new connection next time
                raise StoreUnavailable(_said(exc, self.url)) from None

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        try:
            reader = self._readers.get_nowait()
        except queue.Empty:
            reader = _Session(self._connect(autocommit=True))
        try:
            rows: list[Row] = reader.execute(sql, args).fetchall()
        except psycopg.OperationalError as exc:
            reader.connection.close()
            raise StoreUnavailable(_said(exc, self.url)) from None
        self._readers.put(reader)
        return rows

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            if self._writer is not None:
                self._writer.connection.close()
        while True:
            try:
                self._readers.get_nowait().connection.close()
            except queue.Empty:
                break
        self._listener.join(5)

    # -- what differs from one host --------------------------------------------------

    def _announce(self, db: Session) -> None:
        db.execute("SELECT pg_notify(?, ?)", (CHANNEL, f"work {self._mark}"))

    def _lease(self) -> tuple[str, tuple[Any, ...]]:
        return f"{_NOW} + ?", (self.lease_timeout,)

    def _orphans(self) -> tuple[str, tuple[Any, ...]]:
        return "host = ?", (self.host,)

    def _cancelled(self, db: Session, job_id: str) -> None:
        db.execute("SELECT pg_notify(?, ?)", (CHANNEL, f"cancel {self._mark} {job_id}"))

    def model_history(self) -> list[tuple[str, float | None, float | None, int]]:
        """This host's history: each host's GPU loads and generates at its own pace."""
        return [(r["model"], r["generation"], r["load"], r["samples"]) for r in self._read(
            "SELECT model, generation, load, samples FROM model_history WHERE host = ?",
            (self.host,))]

    def save_model_history(self, model: str, generation: float | None, load: float | None,
                           samples: int) -> None:
        with self._write() as db:
            db.execute("INSERT INTO model_history (host, model, generation, load, samples)"
                       " VALUES (?, ?, ?, ?, ?) ON CONFLICT (host, model) DO UPDATE SET"
                       " generation = excluded.generation, load = excluded.load,"
                       " samples = excluded.samples",
                       (self.host, model, generation, load, samples))

    # -- the fleet ----------------------------------------------------------------------

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        self._on_cancel = callback

    def register(self, models: Iterable[str]) -> None:
        with self._write() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            row = db.execute(f"SELECT {_NOW} - seen_at AS age, machine, pid FROM hosts"
                             " WHERE name = ?" + self.LOCK_ROWS, (self.host,)).fetchone()
            if row is not None and row["age"] < self.lease_timeout and not _gone(row):
                raise StoreInUse(
                    f"{self.location}: a live foreman already uses the host name {self.host!r}"
                    f" (seen {row['age']:.1f} s ago); give this one another jobs.host_name")
            db.execute(f"INSERT INTO hosts (name, seen_at, models, machine, pid)"
                       f" VALUES (?, {_NOW}, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                       " seen_at = excluded.seen_at, models = excluded.models,"
                       " machine = excluded.machine, pid = excluded.pid",
                       (self.host, json.dumps(sorted(models)), socket.gethostname(),
                        os.getpid()))

    def heartbeat(self, models: Iterable[str], running: Iterable[str]) -> set[str]:
        running = list(running)
        lease, lease_args = self._lease()
        with self._write() as db:
            db.execute(f"UPDATE hosts SET seen_at = {_NOW}, models = ? WHERE name = ?",
                       (json.dumps(sorted(models)), self.host))
            db.execute(f"UPDATE jobs SET lease_until = {lease}"
                       " WHERE host = ? AND status = 'running'", (*lease_args, self.host))
            if not running:
                return set()
            still = db.execute(
                f"SELECT id FROM jobs WHERE id IN ({placeholders(running)})"
                " AND status = 'running' AND host = ?", (*running, self.host)).fetchall()
        return set(running) - {row["id"] for row in still}

    def expire_leases(self, max_attempts: int) -> tuple[int, int]:
        """A run lost with its host spent the attempt its claim counted."""
        now = self._clock()
        with self._write(adds_work=True) as db:
            failed = db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, lease_until = NULL,"
                " error = 'interrupted: its host stopped renewing its lease, and its attempts"
                f" are spent' WHERE status = 'running' AND lease_until < {_NOW}"
                " AND attempts >= ?", (now, max_attempts)).rowcount
            requeued = db.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL, not_before = 0,"
                " lease_until = NULL, error = 'its host stopped renewing its lease'"
                f" WHERE status = 'running' AND lease_until < {_NOW}").rowcount
        return requeued, failed

    def fleet_models(self) -> set[str]:
        """Read at most once a second: a listing asks for every queued job."""
        at, models = self._fleet_models
        if time.monotonic() - at >= 1.0:
            rows = self._read(f"SELECT models FROM hosts WHERE {_NOW} - seen_at < ?",
                              (self.lease_timeout,))
            models = {model for row in rows for model in json.loads(row["models"])}
            self._fleet_models = (time.monotonic(), models)
        return models

    def hosts(self) -> list[dict[str, Any]]:
        rows = self._read(f"SELECT name, {_NOW} - seen_at AS age, models FROM hosts"
                          f" WHERE {_NOW} - seen_at < ? ORDER BY name", (self.lease_timeout,))
        running: dict[str, list[dict[str, str]]] = {}
        for job in self._read("SELECT id, model, host FROM jobs WHERE status = 'running'"
                              " ORDER BY started_at"):
            running.setdefault(job["host"], []).append({"job_id": job["id"],
                                                        "model": job["model"]})
        return [{"name": r["name"], "seen_seconds_ago": round(r["age"], 1),
                 "models": json.loads(r["models"]), "running": running.get(r["name"], [])}
                for r in rows]

    def leave(self) -> None:
        with self._write() as db:
            db.execute("DELETE FROM hosts WHERE name = ?", (self.host,))

    def _subscribe(self) -> psycopg.Connection[Any]:
        connection = self._connect(autocommit=True)
        connection.execute(f"LISTEN {CHANNEL}")
        return connection

    def _listen(self) -> None:
        """Turn other hosts' announcements into wake-ups here, reconnecting as needed."""
        connection: psycopg.Connection[Any] | None = self._listening
        while not self._closing.is_set():
            try:
                if connection is None:
                    connection = self._subscribe()
                    self._changed_here(adds_work=True)  # whatever was missed meanwhile
                for notice in connection.notifies(timeout=0.5):
                    what, mark, *job = notice.payload.split(" ")
                    if mark == self._mark:
                        continue
                    if what == "cancel" and job:
                        self._on_cancel(job[0])
                    self._changed_here(adds_work=what == "work")
            except (psycopg.Error, StoreUnavailable) as exc:
                if connection is not None:
                    connection.close()
                    connection = None
                if not self._closing.is_set():
                    log.warning("job store notifications lost, reconnecting: %s",
                                _said(exc, self.url) if isinstance(exc, psycopg.Error)
                                else exc.message)
                    self._closing.wait(1.0)
        if connection is not None:
            connection.close()


def _gone(row: Row) -> bool:
    """Whether the host that last used a name was a process on this machine that has
    died (a restart after a crash need not wait out its lease)."""
    if row["machine"] != socket.gethostname() or row["pid"] == os.getpid():
        return False
    try:
        os.kill(row["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def _said(exc: psycopg.Error, url: str) -> str:
    """The driver's message, one line, never with the password."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    password = urlsplit(url).password
    return text.replace(password, "<redacted>") if password else text
