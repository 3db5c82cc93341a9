"""The job store alone: durability rules, compare-and-set transitions, orphans, pruning."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from foreman.daemon import Daemon
from foreman.errors import ApiError
from foreman.store import JobStore, StoreCorrupt, StoreInUse, StoreUnavailable, open_store
from foreman.store_sqlite import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[JobStore]:
    """The contract: every test on this fixture runs against both backends."""
    if request.param == "sqlite":
        opened: JobStore = SqliteStore(str(tmp_path / "jobs.db"), clock=clock)
    else:
        cluster = request.getfixturevalue("postgres")
        opened = open_store(cluster.database(), host="here", clock=clock)
    yield opened
    opened.close()


def test_settings_make_commits_durable(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "jobs.db"))
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_claim_order_is_priority_then_arrival(store: JobStore) -> None:
    low, _ = store.submit("chat", {"model": "m", "n": 1}, priority=0)
    high, _ = store.submit("chat", {"model": "m", "n": 2}, priority=5)
    low2, _ = store.submit("chat", {"model": "m", "n": 3}, priority=0)
    store.submit("embed", {"model": "e"})
    assert [store.position(j) for j in (high, low, low2)] == [1, 2, 3]
    order = [store.claim(("chat", "generate")) for _ in range(3)]
    assert [j.id for j in order if j] == [high.id, low.id, low2.id]
    assert all(j.status == "running" and j.attempts == 1 for j in order if j)
    assert store.claim(("chat",)) is None
    assert store.claim(("embed",)) is not None


def test_transitions_are_compare_and_set(store: JobStore) -> None:
    store.submit("chat", {"model": "m"})
    job = store.claim(("chat",))
    assert job is not None
    cancelled, was = store.cancel(job.id)
    assert was == "running" and cancelled is not None and cancelled.status == "cancelled"
    assert not store.finish(job, "succeeded", '{"x": 1}')  # lost the race: no overwrite
    assert store.get(job.id).status == "cancelled"


def test_finish_returns_the_job_exactly_as_stored(store: JobStore) -> None:
    store.submit("embed", {"model": "m", "input": "x"}, webhook="http://127.0.0.1:9/hook")
    job = store.claim(("embed",))
    assert job is not None
    finished = store.finish(job, "succeeded", '{"embeddings": [[0.5, -1.25e-3]]}')
    assert finished is not None and finished.status == "succeeded"
    assert finished.result_json == '{"embeddings": [[0.5, -1.25e-3]]}'  # the text, as given
    assert finished == store.get(job.id)  # what the notifier gets without reading it back


def test_only_writes_that_can_make_work_ready_wake_idle_workers(store: JobStore) -> None:
    """A finish sits between one job and the next: waking every idle worker then (to
    look for work it did not add) slowed the hand-off by a millisecond."""
    seen = store.work_version
    job, _ = store.submit("chat", {"model": "m"})
    assert store.wait_for_work(seen, timeout=5) != seen  # returns at once: it changed
    seen = store.work_version
    claimed = store.claim(("chat",))
    assert claimed is not None and store.finish(claimed, "succeeded", "{}")
    store.cancel(job.id)
    assert store.work_version == seen
    assert store.wait_for_work(seen, timeout=0.01) == seen  # nothing to wake for
    store.submit("chat", {"model": "m"})
    again = store.claim(("chat",))
    assert again is not None and store.requeue(again, 0, spend_attempt=True, error="500")
    assert store.work_version == seen + 2  # the submit and the requeue
    store.wake_waiters()  # the shutdown's
    assert store.work_version == seen + 3


def test_requeue_without_spending_an_attempt_and_backoff(store: JobStore, clock: Clock) -> None:
    store.submit("chat", {"model": "m"})
    job = store.claim(("chat",))
    assert store.requeue(job, 10.0, spend_attempt=False, error="target down")
    assert store.get(job.id).attempts == 0
    assert store.claim(("chat",)) is None  # not before 10 s
    clock.now += 10
    again = store.claim(("chat",))
    assert again is not None and again.attempts == 1
    assert store.requeue(again, 0, spend_attempt=True, error="500")
    assert store.get(job.id).attempts == 1


def test_idempotency_key_replays_or_conflicts(store: JobStore) -> None:
    first, created = store.submit("chat", {"model": "m"}, idempotency_key="k1")
    again, created_again = store.submit("chat", {"model": "m"}, idempotency_key="k1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(ApiError) as conflict:
        store.submit("chat", {"model": "other"}, idempotency_key="k1")
    assert conflict.value.status == 409


def test_orphans_are_requeued_or_failed_when_attempts_are_spent(tmp_path: Path,
                                                                clock: Clock) -> None:
    path = str(tmp_path / "jobs.db")
    store = SqliteStore(path, clock=clock)
    fresh, _ = store.submit("chat", {"model": "m"})
    tired, _ = store.submit("chat", {"model": "m"}, priority=9)
    for _ in range(3):  # three interrupted attempts
        claimed = store.claim(("chat",))
        assert claimed is not None and claimed.id == tired.id
        if claimed.attempts < 3:
            store.requeue(claimed, 0, spend_attempt=True, error=None)
    assert store.claim(("chat",)).id == fresh.id
    store.close()  # "crash": both rows are running

    reopened = SqliteStore(path, clock=clock)
    assert reopened.recover_orphans(max_attempts=3) == (1, 1)
    assert reopened.get(fresh.id).status == "queued"
    failed = reopened.get(tired.id)
    assert failed.status == "failed" and failed.error.startswith("interrupted")


def test_list_is_newest_first_with_a_cursor(store: JobStore) -> None:
    ids = [store.submit("embed", {"model": "m", "i": i})[0].id for i in range(5)]
    page, cursor = store.list(limit=2)
    assert [j.id for j in page] == ids[:-3:-1]
    page2, cursor2 = store.list(limit=2, after=cursor)
    page3, cursor3 = store.list(limit=2, after=cursor2)
    assert [j.id for j in page2 + page3] == ids[2::-1] and cursor3 is None
    assert store.list(status="running")[0] == []


def test_prune_removes_only_old_finished_jobs(store: JobStore, clock: Clock) -> None:
    store.submit("chat", {"model": "m"})
    job = store.claim(("chat",))
    store.finish(job, "succeeded", "{}")
    waiting, _ = store.submit("chat", {"model": "m"})
    clock.now += 3600
    assert store.prune(older_than=7200) == 0
    clock.now += 7200
    assert store.prune(older_than=7200) == 1
    assert store.get(job.id) is None and store.get(waiting.id) is not None


def test_delete_only_finished(store: JobStore) -> None:
    job, _ = store.submit("chat", {"model": "m"})
    assert store.delete(job.id) == "unfinished"
    store.cancel(job.id)
    assert store.delete(job.id) == "deleted"
    assert store.delete(job.id) == "missing"


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreCorrupt, match=str(path)):
        SqliteStore(str(path))


def test_read_only_database_refuses_writes_with_503(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    SqliteStore(str(path)).close()
    store = SqliteStore(f"file:{path}?mode=ro")
    with pytest.raises(StoreUnavailable) as refused:
        store.submit("chat", {"model": "m"})
    assert refused.value.status == 503 and "readonly" in refused.value.message
    assert not isinstance(refused.value, sqlite3.Error)


def test_the_line_in_claim_order_and_ahead_of_a_job(store: JobStore) -> None:
    low, _ = store.submit("chat", {"model": "a"}, priority=0)
    high, _ = store.submit("generate", {"model": "b", "prompt": "x"}, priority=5)
    store.submit("embed", {"model": "e", "input": "x"})
    last, _ = store.submit("chat", {"model": "c"}, priority=0)
    line = store.line(("chat", "generate"))
    assert [(q.id, q.model) for q in line] == [(high.id, "b"), (low.id, "a"), (last.id, "c")]
    assert [q.id for q in store.line(("chat", "generate"), ahead_of=last)] == [high.id, low.id]
    assert store.line(("chat", "generate"), ahead_of=high) == []


def test_a_database_from_before_the_model_column_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL, status TEXT NOT NULL, priority INTEGER NOT NULL,
            request TEXT NOT NULL, webhook TEXT, idempotency_key TEXT UNIQUE,
            fingerprint TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL,
            finished_at REAL, not_before REAL NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0, result TEXT, error TEXT);
        INSERT INTO jobs (id, kind, status, priority, request, fingerprint, created_at)
            VALUES ('old1', 'chat', 'queued', 0, '{"model": "llama3", "messages": []}', 'f', 1);
    """)
    old.commit()
    old.close()
    store = SqliteStore(str(path))
    assert [(q.id, q.model) for q in store.line(("chat",))] == [("old1", "llama3")]
    job = store.claim(("chat",))
    assert job is not None and job.model == "llama3"
    store.close()
    assert [(q.id, q.model) for q in SqliteStore(str(path)).line(("chat",))] == []


def test_an_exclusive_store_refuses_a_second_owner_until_the_first_closes(
        tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.db")
    first = SqliteStore(path, exclusive=True)
    with pytest.raises(StoreInUse, match=rf"in use by another foreman \(pid {os.getpid()}\)"):
        SqliteStore(path, exclusive=True)
    SqliteStore(path).close()  # a reader that does not own the store is fine
    first.close()
    SqliteStore(path, exclusive=True).close()


def test_reads_never_wait_behind_another_process_holding_the_write_lock(
        make_foreman: Callable[..., Daemon]) -> None:
    """Regression (issue 13.10): with another connection holding the write lock (someone
    browsing foreman.db in a GUI), every read waited 24.6 s behind one Python lock."""
    daemon = make_foreman()
    job = requests.post(daemon.url + "/jobs", timeout=5, json={
        "kind": "chat", "request": {"model": "nomic-embed-text"}}).json()
    other = sqlite3.connect(daemon.store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        # A write that now waits for the lock (the worker's claim, or this submit).
        blocked = threading.Thread(target=lambda: requests.post(
            daemon.url + "/jobs", timeout=30, json={
                "kind": "embed", "request": {"model": "nomic-embed-text", "input": "x"}}))
        blocked.start()
        for path in ("/jobs", f"/jobs/{job['id']}", "/queue", "/metrics"):
            answer = requests.get(daemon.url + path, timeout=3)
            assert answer.status_code == 200, (path, answer.text)
    finally:
        other.execute("ROLLBACK")
        other.close()
    blocked.join(15)
