"""A fleet: several foremans, each in front of its own target with its own models,
sharing one job queue in a real PostgreSQL (a throwaway cluster; these tests skip
locally without PostgreSQL and fail in CI without it)."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from foreman.config import parse_config
from foreman.daemon import Daemon, build_daemon
from foreman.store import JobStore, StoreInUse, StoreUnavailable, model_key, open_store
from tests.browser import browser_page
from tests.conftest import LogStream, config_data
from tests.fake_ollama import FakeOllama
from tests.postgres import Cluster
from tests.procs import ROOT, ForemanProcess

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def database(postgres: Cluster) -> str:
    return postgres.database()


@pytest.fixture
def fleet(tmp_path: Path, database: str) -> Iterator[Callable[..., tuple[Daemon, FakeOllama]]]:
    """Makes hosts: a fake target with the given models and a foreman in front of it,
    all on one database."""
    made: list[tuple[Daemon, FakeOllama]] = []

    def host(name: str, *models: str, **jobs: Any) -> tuple[Daemon, FakeOllama]:
        fake = FakeOllama(models=models).start()
        data = config_data(fake.url, tmp_path, jobs={"db": database, "host_name": name,
                                                     **jobs})
        try:
            daemon = build_daemon(parse_config(data))
        except BaseException:
            fake.stop()
            raise
        daemon.start()
        daemon.inventory.wait_for(lambda s: s.last_attempt is not None, 5)
        made.append((daemon, fake))
        return daemon, fake

    yield host
    for daemon, fake in made:
        daemon.shutdown(drain_timeout=2)
        fake.stop()


def submit(url: str, model: str) -> dict[str, Any]:
    answer = requests.post(url + "/jobs", timeout=10,
                           json={"kind": "chat", "request": {"model": model, **CHAT}})
    assert answer.status_code == 202, answer.text
    return dict(answer.json())


def wait_status(url: str, job_id: str, statuses: tuple[str, ...], timeout: float = 20
                ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = requests.get(f"{url}/jobs/{job_id}?wait=1", timeout=10).json()
        if job["status"] in statuses or time.monotonic() > deadline:
            return dict(job)


def test_jobs_run_on_the_host_whose_target_has_their_model(
        fleet: Callable[..., tuple[Daemon, FakeOllama]]) -> None:
    first, alpha = fleet("first", "alpha:latest")
    second, beta = fleet("second", "beta:latest")
    jobs = [submit(first.url, model) for model in ["alpha", "beta"] * 3]  # any host takes all
    nowhere = submit(second.url, "gamma")  # no host has it: accepted, and says why
    done = [wait_status(second.url, job["id"], ("succeeded", "failed")) for job in jobs]
    assert [job["status"] for job in done] == ["succeeded"] * 6
    assert [job["host"] for job in done] == ["first", "second"] * 3
    assert {r.json["model"] for r in alpha.requests_to("/api/chat")} == {"alpha"}
    assert {r.json["model"] for r in beta.requests_to("/api/chat")} == {"beta"}
    waiting = requests.get(f"{first.url}/jobs/{nowhere['id']}", timeout=5).json()
    assert waiting["status"] == "queued"
    assert "no live host has model 'gamma'" in waiting["wait_reason"]
    # Not in this host's line (nor any host's): no place and no estimate to give.
    assert waiting["position"] is None and waiting["estimated_start"] is None
    assert requests.get(f"{first.url}/queue", timeout=5).json()["waiting"] == []
    listed = requests.get(f"{second.url}/jobs?limit=50", timeout=5).json()["jobs"]
    assert {job["id"] for job in listed} == {job["id"] for job in [*jobs, nowhere]}
    hosts = requests.get(f"{first.url}/queue", timeout=5).json()["hosts"]
    assert [(h["name"], h["models"], h["running"]) for h in hosts] == [
        ("first", ["registry.ollama.ai/library/alpha:latest"], []),
        ("second", ["registry.ollama.ai/library/beta:latest"], [])]
    metrics = requests.get(f"{second.url}/metrics", timeout=5).text
    assert 'foreman_jobs_running_here{host="second"} 0' in metrics
    assert 'foreman_jobs{host="second",status="queued"} 1' in metrics  # the fleet's queue
    series = [line for line in metrics.splitlines() if line and not line.startswith("#")]
    assert all('host="second"' in line for line in series)  # every series says whose


def test_a_second_live_host_with_the_same_name_is_refused(
        fleet: Callable[..., tuple[Daemon, FakeOllama]]) -> None:
    fleet("twin", "alpha:latest")
    with pytest.raises(StoreInUse, match="twin"):
        fleet("twin", "beta:latest")


def test_cancelling_on_one_host_aborts_the_run_on_another_within_a_second(
        fleet: Callable[..., tuple[Daemon, FakeOllama]]) -> None:
    runner, slow = fleet("runner", "alpha:latest")
    asker, _ = fleet("asker", "beta:latest")
    slow.token_delay, slow.tokens = 0.05, 400  # 20 s unless cut
    job = submit(asker.url, "alpha")
    assert slow.wait_for(lambda: slow.stats.generations_active == 1, 10)
    hosts = requests.get(f"{asker.url}/queue", timeout=5).json()["hosts"]
    assert {h["name"]: h["running"] for h in hosts} == {
        "asker": [], "runner": [{"job_id": job["id"], "model": "alpha"}]}  # who runs what
    with browser_page() as page:  # and the status page of either host shows it
        page.goto(asker.url + "/status")
        page.wait_for_selector(f"#hosts tr:has-text('runner') >> text={job['id']}")
        assert "beta" in page.inner_text("#hosts tr:has-text('asker')")
    cancelled = requests.post(f"{asker.url}/jobs/{job['id']}/cancel", timeout=5)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    asked_at = time.monotonic()
    assert slow.wait_for(lambda: "/api/chat" in slow.stats.gone, 3)
    assert time.monotonic() - asked_at < 1.0
    final = requests.get(f"{runner.url}/jobs/{job['id']}", timeout=5).json()
    assert final["status"] == "cancelled"


def test_a_job_lost_with_its_host_runs_on_another_after_the_lease_and_never_on_both(
        fleet: Callable[..., tuple[Daemon, FakeOllama]], tmp_path: Path, database: str
) -> None:
    doomed_target = FakeOllama(models=("alpha:latest",)).start()
    doomed_target.token_delay, doomed_target.tokens = 0.05, 2000  # 100 s unless cut
    config = tmp_path / "doomed.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ntarget:\n  url: {doomed_target.url}\n"
                      f"jobs:\n  db: {database}\n  host_name: doomed\n  lease_timeout: 5s\n")
    doomed = ForemanProcess("-c", str(config))
    try:
        url = doomed.wait_serving(20)
        job = submit(url, "alpha")
        assert doomed_target.wait_for(lambda: doomed_target.stats.generations_active == 1, 10)
        survivor, target = fleet("survivor", "alpha:latest", lease_timeout="5s")
        doomed.kill()  # kill -9: no shutdown, no requeue, the lease just stops
        killed_at = time.monotonic()
        assert doomed_target.wait_for(lambda: "/api/chat" in doomed_target.stats.gone, 5)
        assert target.wait_for(lambda: len(target.stats.started_at) == 1, 20)
        assert time.monotonic() - killed_at >= 4.0  # not before the lease ran out
        with doomed_target.cond:
            (_, _, doomed_run_ended), = doomed_target.stats.runs
        assert doomed_run_ended <= target.stats.started_at[0]  # never on both at once
        final = wait_status(survivor.url, job["id"], ("succeeded", "failed"), 60)
        assert final["status"] == "succeeded" and final["host"] == "survivor"
        assert final["attempts"] == 2  # the run lost with its host spent one
    finally:
        if doomed.proc.poll() is None:
            doomed.kill()
        doomed_target.stop()


@pytest.fixture
def two_stores(database: str) -> Iterator[list[JobStore]]:
    """Two hosts' stores on one database, without daemons around them."""
    stores = [open_store(database, host=name) for name in ("one", "two")]
    yield stores
    for store in stores:
        store.close()


def on_threads(work: Callable[[JobStore], None], stores: list[JobStore], each: int) -> None:
    """`work(store)` on `each` threads per store at once; returns when all are done."""
    threads = [threading.Thread(target=work, args=(store,))
               for store in stores for _ in range(each)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def test_claims_never_hand_one_job_to_two_hosts(two_stores: list[JobStore]) -> None:
    """Two hosts' stores, eight claiming threads each, 300 jobs: each claimed once."""
    for _ in range(300):
        two_stores[0].submit("chat", {"model": "alpha"})
    claims: list[tuple[str, str]] = []
    lock = threading.Lock()

    def drain(store: JobStore) -> None:
        while (job := store.claim(("chat",), available=[model_key("alpha")])) is not None:
            with lock:
                claims.append((job.id, store.host))
            assert store.finish(job, "succeeded", "{}") is not None

    on_threads(drain, two_stores, 8)
    ids = [job_id for job_id, _ in claims]
    assert len(ids) == 300 and len(set(ids)) == 300
    assert {host for _, host in claims} == {"one", "two"}  # both took part
    assert two_stores[1].counts()["succeeded"] == 300


def test_an_idempotency_key_is_unique_across_the_fleet(two_stores: list[JobStore]) -> None:
    results: list[tuple[str, bool]] = []
    start = threading.Barrier(8)

    def submit_once(store: JobStore) -> None:
        start.wait(10)
        job, created = store.submit("chat", {"model": "alpha"}, idempotency_key="k")
        results.append((job.id, created))

    on_threads(submit_once, two_stores, 4)
    assert len(results) == 8 and len({job_id for job_id, _ in results}) == 1
    assert sorted(created for _, created in results) == [False] * 7 + [True]


def test_a_run_the_store_no_longer_gives_this_host_is_cut_at_the_next_renewal(
        fleet: Callable[..., tuple[Daemon, FakeOllama]], database: str) -> None:
    """Without the announcement (a listener reconnecting, say): a job cancelled, or
    taken back after this host's lease ran out, is cut when it renews its leases."""
    import psycopg

    runner, slow = fleet("runner", "alpha:latest", lease_timeout="6s")
    slow.token_delay, slow.tokens = 0.05, 2000
    job = submit(runner.url, "alpha")
    assert slow.wait_for(lambda: slow.stats.generations_active == 1, 10)
    with psycopg.connect(database, autocommit=True) as db:  # no NOTIFY: the store itself
        db.execute("UPDATE jobs SET status = 'queued', host = NULL WHERE id = %s",
                   (job["id"],))
    changed_at = time.monotonic()
    assert slow.wait_for(lambda: "/api/chat" in slow.stats.gone, 5)
    assert time.monotonic() - changed_at <= 2.0 + 0.5  # a renewal every 6 s / 3


def test_twenty_random_kills_under_load_lose_no_job_and_never_run_one_twice_at_once(
        tmp_path: Path, database: str) -> None:
    """Three hosts with overlapping models; one of them is killed (kill -9) and
    restarted twenty times while 240 jobs run.  Every job ends succeeded, and the
    targets' own records never show one job running on two of them at once."""
    models = {"h1": ("alpha:latest", "beta:latest"), "h2": ("beta:latest", "gamma:latest"),
              "h3": ("alpha:latest", "gamma:latest")}
    targets = {name: FakeOllama(models=held, tokens=10).start() for name, held in models.items()}
    configs = {}
    for name, target in targets.items():
        target.token_delay = 0.02
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(
            f"listen: 127.0.0.1:0\ntarget:\n  url: {target.url}\ninventory:\n"
            f"  poll_interval: 200ms\njobs:\n  db: {database}\n  host_name: {name}\n"
            "  lease_timeout: 5s\n  max_attempts: 50\n")
    hosts = {name: ForemanProcess("-c", str(config)) for name, config in configs.items()}
    chooser = random.Random(15)
    try:
        urls = {name: host.wait_serving(30) for name, host in hosts.items()}
        ids = [requests.post(urls["h1"] + "/jobs", timeout=10, json={"kind": "chat", "request": {
            "model": model, "options": {"tag": str(index)}, **CHAT}}).json()["id"]
            for index, model in enumerate(["alpha", "beta", "gamma"] * 80)]
        for _ in range(20):
            time.sleep(chooser.uniform(0.2, 0.8))
            name = chooser.choice(sorted(hosts))
            hosts[name].kill()
            hosts[name] = ForemanProcess("-c", str(configs[name]))
            urls[name] = hosts[name].wait_serving(30)
        deadline = time.monotonic() + 120
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            listed = requests.get(urls["h2"] + "/jobs?limit=500&brief=1", timeout=10).json()
            pending = {job["id"] for job in listed["jobs"]
                       if job["id"] in pending and job["status"] != "succeeded"}
            time.sleep(0.2)
        assert not pending, f"{len(pending)} jobs did not succeed"
        runs: dict[str, list[tuple[float, float]]] = {}
        for target in targets.values():
            with target.cond:
                for tag, began, ended in target.stats.runs:
                    runs.setdefault(tag, []).append((began, ended))
        assert len(runs) == 240
        assert sum(len(spans) for spans in runs.values()) > 240  # kills did cut runs
        for tag, spans in runs.items():
            spans.sort()
            for (_, first_end), (second_start, _) in itertools.pairwise(spans):
                assert second_start >= first_end, f"job {tag} ran on two targets at once"
    finally:
        for host in hosts.values():
            if host.proc.poll() is None:
                host.kill()
        for target in targets.values():
            target.stop()


def test_the_database_password_is_never_logged_nor_shown(
        postgres: Cluster, tmp_path: Path, log_text: LogStream) -> None:
    """The cluster trusts loopback, so any password connects: it is only carried."""
    url = postgres.database().replace("postgres@", "postgres:s3cret-pw@")
    fake = FakeOllama(models=("alpha:latest",)).start()
    config = tmp_path / "c.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ntarget:\n  url: {fake.url}\n"
                      f"jobs:\n  db: {url}\n  host_name: quiet\n")
    try:
        checked = subprocess.run([sys.executable, str(ROOT / "foreman.py"), "-c", str(config),
                                  "--check"], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stderr
        assert "s3cret-pw" not in checked.stdout + checked.stderr
        assert "postgresql://<redacted>@127.0.0.1" in checked.stdout
        daemon = build_daemon(parse_config(config_data(
            fake.url, tmp_path, jobs={"db": url, "host_name": "quiet"})))
        daemon.start()
        submit(daemon.url, "alpha")
        daemon.shutdown(drain_timeout=2)
        assert log_text.wait_for("job store postgresql://<redacted>@127.0.0.1")
        assert "s3cret-pw" not in log_text.getvalue()
    finally:
        fake.stop()


def test_a_second_process_with_a_live_hosts_name_exits_2_naming_it(
        fleet: Callable[..., tuple[Daemon, FakeOllama]], tmp_path: Path, database: str
) -> None:
    _, fake = fleet("studio", "alpha:latest")
    config = tmp_path / "twin.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ntarget:\n  url: {fake.url}\n"
                      f"jobs:\n  db: {database}\n  host_name: studio\n")
    twin = subprocess.run([sys.executable, str(ROOT / "foreman.py"), "-c", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert twin.returncode == 2
    assert "host name 'studio'" in twin.stderr and "Traceback" not in twin.stderr


def test_new_work_wakes_an_idle_host_at_once_not_at_its_next_poll(
        fleet: Callable[..., tuple[Daemon, FakeOllama]]) -> None:
    """An idle worker waits at most a second before it looks again; the announcement
    of a job submitted on another host must wake it well before that."""
    _, target = fleet("idle", "alpha:latest")
    front, _ = fleet("front", "beta:latest")
    delays = []
    for _ in range(5):
        time.sleep(0.3)  # the idle host's worker is waiting again
        seen = len(target.requests_to("/api/chat"))
        sent = time.monotonic()
        submit(front.url, "alpha")
        assert target.wait_for(lambda seen=seen: len(target.requests_to("/api/chat")) > seen,
                               5)
        delays.append(time.monotonic() - sent)
    assert max(delays) < 0.5, delays


def test_a_host_cut_off_from_the_store_stops_its_runs_before_its_lease_runs_out(
        fleet: Callable[..., tuple[Daemon, FakeOllama]]) -> None:
    """Renewals failing (the database unreachable from this host, or the host asleep):
    its runs stop before another host may take the jobs back, never after."""
    runner, slow = fleet("cut-off", "alpha:latest", lease_timeout="6s")
    slow.token_delay, slow.tokens = 0.05, 2000
    submit(runner.url, "alpha")
    assert slow.wait_for(lambda: slow.stats.generations_active == 1, 10)

    def unreachable(*_: object) -> set[str]:
        raise StoreUnavailable("connection refused (simulated)")

    runner.store.heartbeat = unreachable  # type: ignore[method-assign]
    cut_off_at = time.monotonic()
    assert slow.wait_for(lambda: "/api/chat" in slow.stats.gone, 8)
    assert time.monotonic() - cut_off_at < 6.0  # the lease (6 s) had not run out
