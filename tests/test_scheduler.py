"""The scheduler (issue 15): model affinity within the line's rules and its bound, the
jobs' share, holding the slot for a client that comes right back, what foreman
learns from Ollama's own account of each generation, and that it keeps it across a
restart; unit-level with a fake clock, then end to end on a simulated GPU."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from foreman.daemon import Daemon
from foreman.estimates import Estimator, load_seconds
from foreman.lane import Lane, Work
from foreman.queue_view import QueueView
from foreman.schedule import (
    BATCH,
    INTERACTIVE,
    Candidate,
    Choice,
    PerJob,
    Residency,
    Scheduler,
    next_turn,
)
from foreman.store_sqlite import SqliteStore
from tests.conftest import LogStream
from tests.fake_ollama import FakeOllama, Fault, Gpu

CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": False}


def final(load_ns: int) -> bytes:
    return (b'{"model":"m","done":true,"total_duration":900000000,"load_duration":'
            + str(load_ns).encode() + b',"eval_count":5}\n')


def test_the_load_comes_from_ollamas_load_duration_not_from_looking_resident() -> None:
    """Before, a first sample on a cold GPU was learned as generation time (after W3 the
    history said 0.70 s generation and 0.0002 s load; the truth was 0.2 + 0.5)."""
    saved: list[tuple[str, float | None, float | None, int]] = []
    estimator = Estimator(save=lambda m, h: saved.append((m, h.generation, h.load, h.samples)))
    estimator.record("llama3", 0.7, resident=False, final=final(500_000_000))
    history = estimator.known()["registry.ollama.ai/library/llama3:latest"]
    assert history["generation_seconds"] == pytest.approx(0.2)
    assert history["load_seconds"] == pytest.approx(0.5)
    estimator.record("llama3", 0.21, resident=False, final=final(3_000_000))  # resident
    history = estimator.known()["registry.ollama.ai/library/llama3:latest"]
    assert history["load_seconds"] == pytest.approx(0.5)  # a few ms is no load
    assert history["generation_seconds"] == pytest.approx(0.3 * 0.207 + 0.7 * 0.2)
    assert estimator.loads() == [("registry.ollama.ai/library/llama3:latest", 1,
                                  pytest.approx(0.5))]
    # Saved at the first sample, then at most every 30 s (a write per generation would
    # sit between one job and the next), and whatever is left at shutdown.
    assert [row[0] for row in saved] == ["registry.ollama.ai/library/llama3:latest"]
    estimator.flush()
    assert len(saved) == 2 and saved[-1][3] == 2
    estimator.flush()
    assert len(saved) == 2  # nothing new to save
    assert load_seconds(b"x" * 10_000 + final(1)) == 1e-9
    assert load_seconds(b'{"choices": []}') is None


def test_without_ollamas_account_a_cold_sample_teaches_nothing() -> None:
    estimator = Estimator()
    estimator.record("m", 0.2, resident=True)
    estimator.record("m", 5.0, resident=False)  # a load of unknown length inside
    assert estimator.estimate("m", resident=True) == pytest.approx(0.2)


def test_loads_are_counted_and_learned_from_a_real_swapping_gpu(
        foreman: Daemon, fake: FakeOllama) -> None:
    fake.add_model("a:latest")
    fake.add_model("b:latest")
    fake.gpu = Gpu(capacity=1, load_seconds=0.2)
    foreman.inventory.refresh()
    for model in ("a", "b", "a", "a"):
        answer = requests.post(foreman.url + "/api/chat", json={**CHAT, "model": model},
                               timeout=10)
        assert answer.status_code == 200
    assert fake.gpu.loads == 3
    metrics = requests.get(foreman.url + "/metrics", timeout=5).text
    assert 'foreman_model_loads_total{model="registry.ollama.ai/library/a:latest"} 2' \
        in metrics
    assert 'foreman_model_loads_total{model="registry.ollama.ai/library/b:latest"} 1' \
        in metrics
    history = requests.get(foreman.url + "/queue", timeout=5).json()["history"]
    learned = history["registry.ollama.ai/library/a:latest"]
    assert learned["load_seconds"] == pytest.approx(0.2, abs=0.05)
    assert learned["generation_seconds"] < 0.15  # the loads are not in it


def test_the_history_survives_a_restart(make_foreman: Callable[..., Daemon]) -> None:
    first = make_foreman()
    assert requests.post(first.url + "/api/chat", json={**CHAT, "model": "llama3"},
                         timeout=10).status_code == 200
    assert first.chat_lane.wait_for(lambda lane: lane.in_flight == 0, 5)
    learned = requests.get(first.url + "/queue", timeout=5).json()["history"]
    assert learned
    first.shutdown(drain_timeout=2)
    again = make_foreman()
    assert requests.get(again.url + "/queue", timeout=5).json()["history"] == learned


# -- the rule, with a fake clock ------------------------------------------------------------

A, B, C = (f"registry.ollama.ai/library/{m}:latest" for m in ("a", "b", "c"))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def waiting(*spec: tuple[str, str] | tuple[str, str, int, int]) -> list[Candidate]:
    """(key, model[, tier, priority]) in line order."""
    return [Candidate(s[0], *(s[2:] or (INTERACTIVE, 0)), s[1]) for s in spec]  # type: ignore


def test_affinity_picks_the_first_waiter_for_a_resident_model() -> None:
    passed: dict[object, float] = {}
    line = waiting(("r1", B), ("r2", C), ("r3", A), ("r4", A))
    turn = next_turn(line, [A], passed, 0.0, affinity_wait=10)
    assert turn.index == 2 and "a:latest is loaded" in (turn.reason or "")
    assert passed == {"r1": 0.0, "r2": 0.0}  # the two it passed over, since now
    assert next_turn(line, [B], {}, 0.0, 10).index == 0  # the first is resident
    assert next_turn(line, [A], {}, 0.0, affinity_wait=0).index == 0  # 0: arrival order
    assert next_turn(line, [A, B], {}, 0.0, 10).index == 0  # both resident: no reorder


def test_affinity_never_crosses_tiers_or_priorities() -> None:
    line = waiting(("job1", B, BATCH, 5), ("job2", A, BATCH, 1), ("job3", A, BATCH, 5))
    assert next_turn(line, [A], {}, 0.0, 10).index == 2  # same priority only
    interactive_first = waiting(("r1", B), ("job", A, BATCH, 0))
    assert next_turn(interactive_first, [A], {}, 0.0, 10).index == 0


def test_a_waiter_is_passed_over_for_at_most_affinity_wait() -> None:
    passed: dict[object, float] = {}
    line = waiting(("r1", B), ("r2", A))
    assert next_turn(line, [A], passed, 0.0, 10).index == 1
    assert next_turn(line, [A], passed, 9.9, 10).index == 1
    assert next_turn(line, [A], passed, 10.0, 10).index == 0  # its bound: arrival order


def scheduler(clock: Clock, **settings: float) -> Scheduler:
    values = {"affinity_wait": 10.0, "min_share": 0.0, "share_after": 5.0, **settings}
    return Scheduler(Residency(lambda: []), values["affinity_wait"], values["min_share"],
                     values["share_after"], load_time=lambda model: 2.0, clock=clock)


def test_jobs_get_their_share_of_turns_under_constant_interactive_work() -> None:
    clock = Clock()
    strict, shared = scheduler(clock), scheduler(clock, min_share=0.2)
    line = waiting(("r1", A), ("job", A, BATCH, 0))
    for policy in (strict, shared):
        for turn in range(10):
            policy.granted(f"r{turn}", A, interactive=True)
    assert shared.pick(line)[0] == Choice(0)  # the job has not waited share_after yet
    clock.now += 5
    assert strict.pick(line)[0] == Choice(0)  # min_share 0: interactive always first
    turn, _ = shared.pick(line)
    assert turn is not None and turn.index == 1 and "min_share" in (turn.reason or "")
    shared.granted("job", A, interactive=False)
    shared.granted("r10", A, interactive=True)
    assert shared.pick(line)[0] == Choice(0)  # 1 job in the last 12 turns: still short...
    clock.now += 5
    assert shared.pick(line)[0].index == 1  # ...and it waited again: its share


def test_the_slot_is_held_briefly_for_a_client_that_comes_right_back() -> None:
    """W1: two back-to-back clients on two models.  When A's request ends, B waits
    and would need a swap; A's client is back within milliseconds."""
    clock = Clock()
    policy = scheduler(clock)
    for _ in range(2):  # learn A's client's think time: 10 ms
        policy.granted("a", A, interactive=True)
        policy.released(A, interactive=True)
        clock.now += 0.01
        policy.arrived(A, interactive=True)
    policy.granted("a", A, interactive=True)
    policy.released(A, interactive=True)
    turn, until = policy.pick(waiting(("b", B)))
    assert turn is None and until == pytest.approx(clock.now + 0.025)  # 2 x 10 ms + 5 ms
    clock.now += 0.01
    policy.arrived(A, interactive=True)
    turn, _ = policy.pick(waiting(("b", B), ("a2", A)))
    assert turn is not None and turn.index == 1  # A's client came back: no swap
    policy.granted("a2", A, interactive=True)
    policy.released(A, interactive=True)
    clock.now += 1.0  # this time it does not come back
    turn, _ = policy.pick(waiting(("b", B)))
    assert turn == Choice(0)  # the window passed: B's turn, and its swap


def test_interactive_work_and_the_swaps_back_it_causes_are_measured_for_job_estimates(
) -> None:
    """W2: a client on A every 2.2 s between jobs on B takes its own 0.7 s and the 0.5 s
    reload of B after it; each job waits for that on top of its own time."""
    clock = Clock()
    policy = Scheduler(Residency(lambda: []), 10.0, 0.0, 5.0,
                       load_time=lambda model: 0.5, clock=clock)
    for _ in range(40):  # over a minute of it: two jobs per interactive request
        clock.now += 1.0
        policy.released("b", interactive=False, held=0.2)
        clock.now += 0.5
        policy.released("a", interactive=True, held=0.7)
        clock.now += 0.7
        policy.released("b", interactive=False, held=0.7)  # the reload A caused
    measured = policy.interruption_per_job()
    assert measured.before == pytest.approx(0.7 / 2, rel=0.05)  # A's turn, before a job
    assert measured.reload == pytest.approx(0.5 / 2, rel=0.05)  # inside a job's own turn
    clock.now += 120  # a quiet minute: jobs have the slot to themselves again
    quiet = policy.interruption_per_job()
    assert quiet.before + quiet.reload == pytest.approx(0.0, abs=1e-6)
    for _ in range(30):  # jobs alone, then the client is back
        clock.now += 0.2
        policy.released("b", interactive=False, held=0.2)
    clock.now += 0.7
    policy.released("a", interactive=True, held=0.7)
    clock.now += 0.7
    policy.released("b", interactive=False, held=0.7)
    # Its cost per job is learned afresh, not diluted by the jobs that ran without it.
    fresh = policy.interruption_per_job()
    assert (fresh.before, fresh.reload) == pytest.approx((0.7, 0.5), rel=0.02)


def test_job_estimates_follow_a_change_in_interactive_work_without_jumping() -> None:
    """W2 at 5 s loads: each job waits 10.2 s for the client's request and the reload
    after it.  When the client stops, jobs run back to back: the measure falls to 0,
    by at most a tenth of the way between two reads half a second apart (a job 20
    places back would otherwise jump by a minute), and it gets there."""
    clock = Clock()
    policy = Scheduler(Residency(lambda: []), 10.0, 0.0, 5.0,
                       load_time=lambda model: 5.0, clock=clock)
    assert policy.interruption_per_job() == PerJob()  # no evidence: no charge
    for turn in range(12):
        clock.now += 5.2
        policy.released("a", interactive=True, held=5.2)
        if turn == 0:  # the first evidence is shown as it is, not followed up from 0
            assert policy.interruption_per_job().before == pytest.approx(5.2)
        clock.now += 5.2
        policy.released("b", interactive=False, held=5.2)
        policy.interruption_per_job()
    measured = policy.interruption_per_job()
    steady = measured.before + measured.reload
    assert steady == pytest.approx(5.2 + 5.0, rel=0.05)
    reads = []
    for _ in range(240):  # two minutes of jobs alone, read every half second
        clock.now += 0.25
        policy.released("b", interactive=False, held=0.25)
        clock.now += 0.25
        measured = policy.interruption_per_job()
        reads.append(measured.before + measured.reload)
    steps = [before - after for before, after in zip([steady, *reads], reads, strict=False)]
    assert max(steps) < 0.1 * steady and min(steps) >= 0
    assert reads[-1] == pytest.approx(0.0, abs=0.01)


def test_residency_learns_how_many_models_ollama_keeps() -> None:
    reported: list[str] = []
    residency = Residency(lambda: reported)
    residency.ran("a")
    residency.ran("b")
    assert residency.models() == [B] and residency.capacity == 1
    reported[:] = ["a:latest", "b"]  # /api/ps shows both loaded together
    residency.ran("a")
    assert residency.capacity == 2 and residency.models() == [B, A]


# -- end to end, on a simulated GPU ------------------------------------------------------------

def two_models(fake: FakeOllama, daemon: Daemon, load: float) -> None:
    fake.add_model("a:latest")
    fake.add_model("b:latest")
    fake.gpu = Gpu(capacity=1, load_seconds=load)
    daemon.inventory.refresh()


def test_jobs_for_one_model_run_together_and_the_queue_says_so_beforehand(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    """W3 in small: before, 12 jobs alternating a/b cost 12 loads (every one a swap)."""
    daemon = make_foreman()
    two_models(fake, daemon, load=0.05)
    # The first job keeps the slot busy while the others are submitted and planned.
    first = requests.post(daemon.url + "/jobs", timeout=5, json={"kind": "chat", "request": {
        **CHAT, "model": "a", "options": {"fake_first_token_delay": 2}}}).json()["id"]
    assert fake.wait_for(lambda: len(fake.requests_to("/api/chat")) == 1)
    ids = [requests.post(daemon.url + "/jobs", timeout=5, json={
        "kind": "chat", "request": {**CHAT, "model": model}}).json()["id"]
        for model in ["b", "a"] * 6]
    view = requests.get(daemon.url + "/queue", timeout=5).json()
    planned = [w["job_id"] for w in view["waiting"]]
    assert fake.stats.generations_active == 1  # still the first job: planned beforehand
    # One load in the plan: b's, after a's six (a runs now, so it stays loaded).
    assert [w["loads_model"] for w in view["waiting"]] == [False] * 6 + [True] + [False] * 5
    assert [w["estimated_start"] is None for w in view["waiting"]] == [True] * 12  # no history
    done = [requests.get(f"{daemon.url}/jobs/{job}?wait=30", timeout=40).json()
            for job in [first, *ids]]
    assert all(job["status"] in ("succeeded", "failed") for job in done)
    ran = [job["id"] for job in sorted(done[1:], key=lambda job: job["started_at"])]
    assert ran == planned  # the queue view told the order the scheduler used
    models = [next(j["model"] for j in done if j["id"] == job) for job in ran]
    assert models == ["a"] * 6 + ["b"] * 6
    assert fake.gpu is not None and fake.gpu.loads == 2  # a, then b: once each


def test_a_request_served_out_of_arrival_order_says_why_in_the_access_log(
        make_foreman: Callable[..., Daemon], fake: FakeOllama, log_text: LogStream) -> None:
    daemon = make_foreman()
    two_models(fake, daemon, load=0.05)
    assert requests.post(daemon.url + "/api/chat", json={**CHAT, "model": "a"},
                         timeout=10).status_code == 200
    fake.fault("/api/chat", Fault("hang", seconds=20))
    holder = threading.Thread(target=lambda: requests.post(
        daemon.url + "/api/chat", json={**CHAT, "model": "a"}, timeout=30))
    holder.start()
    assert fake.wait_for(lambda: len(fake.requests_to("/api/chat")) == 2)
    answers: list[requests.Response] = []

    def ask(model: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: answers.append(requests.post(
            daemon.url + "/api/chat", json={**CHAT, "model": model}, timeout=30)))
        thread.start()
        return thread

    waiters = [ask("b")]
    assert daemon.chat_lane.wait_for(lambda lane: lane.waiting == 1, 5)
    waiters.append(ask("a"))
    assert daemon.chat_lane.wait_for(lambda lane: lane.waiting == 2, 5)
    fake.release.set()
    for thread in (holder, *waiters):
        thread.join(30)
    assert [a.json()["model"] for a in answers] == ["a", "b"]  # a first: it was loaded
    assert log_text.wait_for("order=affinity: registry.ollama.ai/library/a:latest is loaded")


def test_jobs_progress_under_constant_interactive_load(make_foreman: Callable[..., Daemon],
                                                      fake: FakeOllama) -> None:
    """Before: with clients always waiting, a queued job never ran (0 of 100 in 60 s)."""
    daemon = make_foreman(jobs={"min_share": 0.2, "share_after": "300ms"})
    fake.token_delay = 0.01
    finished = threading.Event()
    served: list[int] = []

    def client() -> None:
        while not finished.is_set():
            requests.post(daemon.url + "/api/chat", json={**CHAT, "model": "llama3"},
                          timeout=10)
            served.append(1)

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        assert daemon.chat_lane.wait_for(lambda lane: lane.waiting >= 2, 5)  # busy
        job = requests.post(daemon.url + "/jobs", timeout=5, json={
            "kind": "chat", "request": {**CHAT, "model": "llama3"}}).json()
        done = requests.get(f"{daemon.url}/jobs/{job['id']}?wait=20", timeout=30).json()
        assert daemon.chat_lane.waiting >= 1  # the clients were still waiting meanwhile
    finally:
        finished.set()
        for thread in clients:
            thread.join(10)
    assert done["status"] == "succeeded"


def test_the_view_charges_jobs_the_interactive_work_to_come_and_the_reload_after_it(
        tmp_path: Path) -> None:
    """W2 at 5 s loads, measured: each job waits 5.2 s of interactive work before its
    turn and reloads its model (5 s) inside it.  With no interactive work in sight the
    first job is charged that wait too; with a request in line, the request stands in
    for it (charging both made the estimate jump by a turn each time one arrived)."""
    clock = Clock()
    policy = Scheduler(Residency(lambda: []), 20.0, 0.0, 30.0,
                       load_time=lambda model: 5.0, clock=clock)
    for _ in range(12):
        clock.now += 5.2
        policy.released("a", interactive=True, held=5.2)
        clock.now += 5.2
        policy.released("b", interactive=False, held=5.2)
    settled = policy.interruption_per_job()
    assert settled.before == pytest.approx(5.2, rel=0.1)
    assert settled.reload == pytest.approx(5.0, rel=0.1)
    estimator = Estimator([(A, 0.2, 5.0, 10), (B, 0.2, 5.0, 10)])
    lane = Lane("chat slot", 1, 10, scheduler=policy)
    store = SqliteStore(str(tmp_path / "jobs.db"))
    worker = SimpleNamespace(chunks=lambda job_id: 0, available=lambda: None)
    view = QueueView(lane, store, worker, estimator, policy)  # type: ignore[arg-type]
    running = lane.acquire(Work("job", "b", tier=BATCH, label="j0", resident=True))
    for _ in range(2):
        store.submit("chat", {"model": "b"})

    def starts() -> list[float]:
        snapshot = view.snapshot()
        return [_epoch(w["estimated_start"]) - time.time() for w in snapshot["waiting"]]

    first, second = starts()  # a job on B runs (0.2 s); the client is thinking
    assert first == pytest.approx(0.2 + settled.before, abs=0.1)
    assert second - first == pytest.approx(0.2 + settled.reload + settled.before, abs=0.1)
    waiter = threading.Thread(target=lambda: lane.acquire(Work("chat", "a")).release())
    waiter.start()
    assert lane.wait_for(lambda lane_: lane_.waiting == 1, 5)
    request, first, second = starts()  # the client's request is in line: it goes first
    assert request == pytest.approx(0.2, abs=0.1)
    assert first == pytest.approx(0.2 + 5.2, abs=0.1)  # A's own turn, with its load
    assert second - first == pytest.approx(0.2 + 5.0 + settled.before, abs=0.1)  # B's load
    running.release()
    waiter.join(5)
    store.close()


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
