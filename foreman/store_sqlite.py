"""The job store in one SQLite file: the embedded default, one host.

Commits use `synchronous=FULL`.  Every write runs in `BEGIN IMMEDIATE` on the
one writer connection, behind one lock; reads run on connections of their own,
so in WAL mode they never wait behind a writer (ours, or another process holding
the database's write lock).  A daemon opens its store exclusively (an OS lock on
`<db>.lock` that dies with the process), so the rows it finds `running` when it
opens are orphans of its own crash.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .store import (
    BUSY_TIMEOUT,
    JobStore,
    Row,
    Session,
    StoreCorrupt,
    StoreInUse,
    StoreUnavailable,
    model_key,
    model_of,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
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
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    not_before REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    host TEXT,
    lease_until REAL
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

# Columns added since the first release, with their definitions; `_upgrade` adds
# what an older file lacks.
_ADDED_COLUMNS = {
    "model": "TEXT NOT NULL DEFAULT ''",
    "model_key": "TEXT NOT NULL DEFAULT ''",
    "host": "TEXT",
    "lease_until": "REAL",
}


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


def _upgrade(db: sqlite3.Connection) -> None:
    """Databases written before a column existed get it, filled in from what each
    job already says (its request names the model), so the line can be read
    without parsing requests."""
    present = {column["name"] for column in db.execute("PRAGMA table_info(jobs)")}
    missing = [name for name in _ADDED_COLUMNS if name not in present]
    if not missing:
        return
    db.execute("BEGIN IMMEDIATE")
    for name in missing:
        db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {_ADDED_COLUMNS[name]}")
    rows = db.execute("SELECT seq, request FROM jobs").fetchall()
    models = ((model_of(json.loads(row["request"])), row["seq"]) for row in rows)
    db.executemany("UPDATE jobs SET model = ?, model_key = ? WHERE seq = ?",
                   ((model, model_key(model), seq) for model, seq in models))
    db.execute("COMMIT")


class SqliteStore(JobStore):
    def __init__(self, path: str, clock: Callable[[], float] = time.time,
                 exclusive: bool = False, host: str = "") -> None:
        """`exclusive`: this process owns the store (a daemon); another owner makes
        this raise StoreInUse."""
        super().__init__(clock, host)
        self.path = path
        self._lock = threading.Lock()
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
            _upgrade(self._db)
        except sqlite3.DatabaseError as exc:
            self._release_ownership()
            raise StoreCorrupt(f"{path}: cannot open the job database: {exc}") from None

    @property
    def location(self) -> str:
        return self.path if self.path.startswith("file:") else os.path.abspath(self.path)

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
    def _transaction(self) -> Iterator[Session]:
        """`BEGIN IMMEDIATE` on the writer; an OS-level failure becomes StoreUnavailable."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db  # type: ignore[misc]  # sqlite3's Connection fits Session
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(str(exc)) from None

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
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

    def close(self) -> None:
        with self._lock:
            self._db.close()
            for reader in self._all_readers:
                reader.close()
            self._release_ownership()
