"""Async jobs over real sockets: submit, wait, results, cancel, order, outages, webhooks."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest
import requests

from foreman.daemon import Daemon
from foreman.store import StoreUnavailable
from tests.fake_ollama import FakeOllama, Fault, embedding_for
from tests.receiver import Receiver

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


def submit(daemon: Daemon, kind: str, request: dict, **extra: object) -> requests.Response:
    headers = extra.pop("headers", None)
    return requests.post(daemon.url + "/jobs", json={"kind": kind, "request": request, **extra},
                         headers=headers, timeout=10)


def wait_job(daemon: Daemon, job_id: str, seconds: float = 20) -> dict:
    return requests.get(f"{daemon.url}/jobs/{job_id}", params={"wait": seconds},
                        timeout=seconds + 5).json()


def test_chat_job_result_is_the_non_streaming_answer(foreman: Daemon, fake: FakeOllama) -> None:
    response = submit(foreman, "chat", CHAT)
    assert response.status_code == 202
    job = response.json()
    assert response.headers["Location"] == f"/jobs/{job['id']}"
    assert job["status"] in ("queued", "running") and job["kind"] == "chat"
    assert set(job) >= {"id", "kind", "status", "priority", "created_at", "started_at",
                        "finished_at", "attempts", "request", "result", "error", "position"}
    done = wait_job(foreman, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1 and done["error"] is None
    direct = requests.post(fake.url + "/api/chat", json={**CHAT, "stream": False},
                           timeout=5).json()
    assert done["result"] == direct
    assert done["finished_at"] >= done["started_at"] >= done["created_at"]


def test_generate_and_embed_jobs(foreman: Daemon) -> None:
    generate = submit(foreman, "generate", {"model": "llama3", "prompt": "hi"}).json()
    embed = submit(foreman, "embed", {"model": "nomic-embed-text", "input": ["a", "b"]}).json()
    generated = wait_job(foreman, generate["id"])
    assert generated["result"]["response"] == "tok0 tok1 tok2 tok3 tok4 "
    assert generated["result"]["context"] == [1, 2, 3]
    embedded = wait_job(foreman, embed["id"])
    assert embedded["status"] == "succeeded"
    assert embedded["result"]["embeddings"] == [embedding_for("a"), embedding_for("b")]


# Spellings json.dumps would change (1e-3 -> 0.001, 0.10 -> 0.1, é -> \u00e9).
VERBATIM = '{"model": "nomic-embed-text", "embeddings": [[1e-3, 0.10, -2E+2]], "note": "é"}'


def test_an_embed_result_is_served_as_ollama_sent_it(foreman: Daemon, fake: FakeOllama) -> None:
    fake.fault("/api/embed", Fault("status", status=200, body=VERBATIM.encode()))
    job_id = submit(foreman, "embed", {"model": "nomic-embed-text", "input": "x"}).json()["id"]
    assert wait_job(foreman, job_id)["status"] == "succeeded"
    shown = requests.get(f"{foreman.url}/jobs/{job_id}", timeout=5)
    listed = requests.get(f"{foreman.url}/jobs?kind=embed", timeout=5)
    for body in (shown.content, listed.content):
        assert b'"result": ' + VERBATIM.encode() in body
    assert shown.json()["result"] == json.loads(VERBATIM)
    assert listed.json()["jobs"][0]["result"] == json.loads(VERBATIM)


@pytest.mark.parametrize("body", [
    '{"embeddings": [[0.5]]}'.encode("utf-16-le"),  # JSON may be UTF-16
    b'\xef\xbb\xbf{"embeddings": [[0.5]], "note": "\xc3\xa9"}',  # or carry a BOM
    b'{"embeddings": [[0.5]], "note": "\xed\xa0\x80"}',  # a lone surrogate, UTF-8 encoded
], ids=["utf-16", "bom", "surrogate"])
def test_an_embed_result_in_an_odd_encoding_is_stored_as_plain_json(
        foreman: Daemon, fake: FakeOllama, body: bytes) -> None:
    fake.fault("/api/embed", Fault("status", status=200, body=body))
    job_id = submit(foreman, "embed", {"model": "nomic-embed-text", "input": "x"}).json()["id"]
    done = wait_job(foreman, job_id)
    assert done["status"] == "succeeded"
    assert done["result"] == json.loads(body)


def test_idempotent_replay_and_conflict(foreman: Daemon) -> None:
    key = {"Idempotency-Key": "order-42"}
    first = submit(foreman, "chat", CHAT, headers=key)
    again = submit(foreman, "chat", CHAT, headers=key)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = submit(foreman, "chat", {**CHAT, "model": "nomic-embed-text"}, headers=key)
    assert other.status_code == 409


@pytest.mark.parametrize(("body", "error"), [
    (b"", "missing request body"),
    (b"{oops", "invalid JSON"),
    (b'{"kind":"dance","request":{"model":"llama3"}}', "kind must be one of"),
    (b'{"kind":"chat","request":"hi"}', "request must be a JSON object"),
    (b'{"kind":"chat","request":{}}', "model is required"),
    (b'{"kind":"chat","request":{"model":"llama3"},"priority":"high"}', "priority must be"),
    (b'{"kind":"chat","request":{"model":"llama3"},"priority":1.5}', "priority must be"),
    (b'{"kind":"chat","request":{"model":"llama3"},"priority":true}', "priority must be"),
    (b'{"kind":"chat","request":{"model":"llama3"},"webhook":"ftp://x"}', "webhook must be"),
    (b'{"kind":"chat","request":{"model":"llama3"},"webhook":"nope"}', "webhook must be"),
])
def test_bad_submissions_are_400(foreman: Daemon, body: bytes, error: str) -> None:
    response = requests.post(foreman.url + "/jobs", data=body, timeout=5)
    assert response.status_code == 400
    assert error in response.json()["error"]


def test_unknown_model_404_unknown_id_404_bad_cursor_400(foreman: Daemon) -> None:
    assert submit(foreman, "chat", {"model": "ghost"}).status_code == 404
    assert requests.get(foreman.url + "/jobs/nope", timeout=5).status_code == 404
    assert requests.post(foreman.url + "/jobs/nope/cancel", timeout=5).status_code == 404
    assert requests.delete(foreman.url + "/jobs/nope", timeout=5).status_code == 404
    for query in ("after=abc", "after=-1", "limit=0", "limit=x", "status=weird", "kind=x"):
        assert requests.get(foreman.url + "/jobs?" + query, timeout=5).status_code == 400
    for wait in ("x", "61", "-1", "nan"):
        assert requests.get(foreman.url + f"/jobs/nope?wait={wait}", timeout=5).status_code == 400


def test_list_pagination_and_filters(foreman: Daemon) -> None:
    ids = [submit(foreman, "embed", {"model": "nomic-embed-text", "input": str(i)}).json()["id"]
           for i in range(5)]
    for job_id in ids:
        wait_job(foreman, job_id)
    page = requests.get(foreman.url + "/jobs?limit=2&kind=embed", timeout=5).json()
    assert [j["id"] for j in page["jobs"]] == ids[:-3:-1]
    rest = requests.get(foreman.url + f"/jobs?limit=10&after={page['next']}", timeout=5).json()
    assert [j["id"] for j in rest["jobs"]] == ids[2::-1] and rest["next"] is None
    assert requests.get(foreman.url + "/jobs?status=queued", timeout=5).json()["jobs"] == []


def hold_slot(daemon: Daemon, fake: FakeOllama, seconds: float = 30) -> threading.Thread:
    """An interactive chat that occupies the chat slot until the fake is released."""
    fake.fault("/api/chat", Fault("hang", seconds=seconds))
    thread = threading.Thread(target=lambda: requests.post(
        daemon.url + "/api/chat", json=CHAT, timeout=60))
    thread.start()
    assert daemon.chat_lane.wait_for(lambda s: s.in_flight == 1, 5)
    assert fake.wait_for(lambda: len(fake.requests_to("/api/chat")) == 1)
    return thread


def test_priority_order_and_cancel_queued(foreman: Daemon, fake: FakeOllama) -> None:
    holder = hold_slot(foreman, fake)
    jobs = {name: submit(foreman, "chat", {**CHAT, "options": {"tag": name}},
                         priority=prio).json()["id"]
            for name, prio in (("low-a", 0), ("high", 10), ("low-b", 0), ("mid", 5), ("gone", 7))}
    queued = requests.get(f"{foreman.url}/jobs/{jobs['low-b']}", timeout=5).json()
    assert queued["status"] == "queued" and queued["position"] == 5
    cancelled = requests.post(f"{foreman.url}/jobs/{jobs['gone']}/cancel", timeout=5)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    fake.release.set()
    holder.join(10)
    for job_id in jobs.values():
        wait_job(foreman, job_id)
    tags = [r.json["options"]["tag"] for r in fake.requests_to("/api/chat")[1:]]
    assert tags == ["high", "mid", "low-a", "low-b"]
    again = requests.post(f"{foreman.url}/jobs/{jobs['high']}/cancel", timeout=5)
    assert again.status_code == 409
    assert requests.delete(f"{foreman.url}/jobs/{jobs['high']}", timeout=5).status_code == 200


def test_an_interactive_chat_overtakes_queued_jobs(foreman: Daemon, fake: FakeOllama) -> None:
    fake.fault("/api/chat", Fault("hang"))  # job-1 holds the slot until released
    first = submit(foreman, "chat", {**CHAT, "options": {"tag": "job-1"}}).json()["id"]
    assert fake.wait_for(lambda: len(fake.requests_to("/api/chat")) == 1)
    later = [submit(foreman, "chat", {**CHAT, "options": {"tag": f"job-{i}"}}).json()["id"]
             for i in (2, 3)]
    answers: list[requests.Response] = []
    interactive = threading.Thread(target=lambda: answers.append(requests.post(
        foreman.url + "/api/chat", timeout=20,
        json={**CHAT, "stream": False, "options": {"tag": "interactive"}})))
    interactive.start()
    assert foreman.chat_lane.wait_for(lambda s: s.waiting == 1, 5)
    fake.release.set()
    interactive.join(20)
    assert answers[0].status_code == 200
    for job_id in later:
        assert wait_job(foreman, job_id)["status"] == "succeeded"
    # job-1's connection was cut by the release: it was requeued and ran again.
    assert wait_job(foreman, first)["status"] == "succeeded"
    tags = [r.json["options"]["tag"] for r in fake.requests_to("/api/chat")]
    assert tags[:2] == ["job-1", "interactive"]
    assert sorted(tags[2:]) == ["job-1", "job-2", "job-3"]


def test_cancel_running_aborts_the_upstream(foreman: Daemon, fake: FakeOllama) -> None:
    fake.token_delay = 0.05
    fake.tokens = 400
    job_id = submit(foreman, "chat", CHAT).json()["id"]
    assert fake.wait_for(lambda: fake.stats.generations_active == 1)

    def has_partial() -> bool:
        job = requests.get(f"{foreman.url}/jobs/{job_id}", timeout=5).json()
        return job["status"] == "running" and job.get("partial", "").startswith("tok0 tok1 ")

    assert fake.wait_for(lambda: len(fake.received) > 0 and has_partial(), 10)
    response = requests.post(f"{foreman.url}/jobs/{job_id}/cancel", timeout=5)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert fake.wait_for(lambda: "/api/chat" in fake.stats.gone, 3)
    final = wait_job(foreman, job_id, 2)
    assert final["status"] == "cancelled" and final["error"] == "cancelled by request"
    assert foreman.chat_lane.wait_for(lambda s: s.in_flight == 0, 3)


def test_jobs_wait_while_the_target_is_down_and_finish_after(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(target={"connect_timeout": "300ms"})
    fake.stop()
    assert daemon.inventory.wait_for(lambda s: s.degraded, 3)
    ids = [submit(daemon, kind, req).json()["id"] for kind, req in (
        ("chat", CHAT), ("embed", {"model": "nomic-embed-text", "input": "x"}),
        ("generate", {"model": "ghost-while-down", "prompt": "x"}))]
    statuses = [requests.get(f"{daemon.url}/jobs/{i}", timeout=5).json() for i in ids]
    assert all(s["status"] == "queued" for s in statuses)
    fake.add_model("ghost-while-down:latest")
    fake.start()
    finished = [wait_job(daemon, i) for i in ids]
    assert [f["status"] for f in finished] == ["succeeded"] * 3
    assert all(f["attempts"] == 1 for f in finished)


def test_target_4xx_fails_at_once_and_5xx_is_retried(
        foreman: Daemon, fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("foreman.worker.retry_delay", lambda attempts: 0.05)
    fake.fault("/api/generate", Fault("status", status=400, body=b'{"error":"bad options"}'))
    failed = wait_job(foreman, submit(foreman, "generate", {"model": "llama3"}).json()["id"])
    assert failed["status"] == "failed" and failed["error"] == "bad options"
    assert failed["attempts"] == 1
    fake.fault("/api/generate", Fault("status", status=500, body=b'{"error":"runner died"}'))
    retried = wait_job(foreman, submit(foreman, "generate", {"model": "llama3"}).json()["id"])
    assert retried["status"] == "succeeded" and retried["attempts"] == 2
    for _ in range(3):
        fake.fault("/api/embed", Fault("status", status=500, body=b'{"error":"oom"}'))
    spent = wait_job(foreman, submit(foreman, "embed", {"model": "llama3", "input": "x"}).json()[
        "id"])
    assert spent["status"] == "failed" and spent["attempts"] == 3
    assert spent["error"].startswith("oom")


@pytest.fixture
def hook(receivers: Callable[..., Receiver]) -> Receiver:
    """A webhook receiver that fails its first delivery."""
    return receivers(statuses=(500, 204))


def test_webhook_gets_the_finished_job_with_retries(foreman: Daemon, hook: Receiver) -> None:
    job_id = submit(foreman, "chat", CHAT, webhook=hook.url).json()["id"]
    assert hook.wait(2)
    first, retry = hook.got[0].json, hook.got[1].json
    assert first == retry and retry["id"] == job_id and retry["status"] == "succeeded"


def test_long_poll_returns_when_the_job_ends(foreman: Daemon, fake: FakeOllama) -> None:
    fake.token_delay = 0.05
    job_id = submit(foreman, "chat", CHAT).json()["id"]
    done = requests.get(f"{foreman.url}/jobs/{job_id}?wait=30", timeout=40).json()
    assert done["status"] == "succeeded"
    quick = requests.get(f"{foreman.url}/jobs/{job_id}?wait=0", timeout=5)
    assert quick.status_code == 200


@pytest.mark.parametrize("line", [b"<html>oops</html>", b'{"message": "\xff\xfe broken"}',
                                  b"[1, 2]"])
def test_a_stream_line_ollama_never_sends_fails_the_job_not_strands_it(
        make_foreman: Callable[..., Daemon], fake: FakeOllama, hook: Receiver,
        monkeypatch: pytest.MonkeyPatch, line: bytes) -> None:
    """Regression (issue 13.1): a non-JSON or invalid UTF-8 line left the job `running`
    until a restart, with no retry and no webhook."""
    monkeypatch.setattr("foreman.worker.retry_delay", lambda attempts: 0.05)
    daemon = make_foreman(jobs={"max_attempts": 2})
    for _ in range(2):
        fake.fault("/api/chat", Fault("line_after", after=1, body=line))
    job_id = submit(daemon, "chat", CHAT, webhook=hook.url).json()["id"]
    done = wait_job(daemon, job_id)
    assert done["status"] == "failed" and done["attempts"] == 2
    assert done["error"].startswith("ollama answered badly: a stream line that is not")
    assert done["error"].endswith("(after 2 attempts)")
    assert hook.wait(2)  # the receiver fails its first delivery; the retry arrives
    assert hook.got[-1].json["status"] == "failed"


@pytest.mark.parametrize(("fault", "settings", "error"), [
    (Fault("die_after", after=1), {},
     "ollama failed mid-request: connection to ollama lost mid-response"
     " (ChunkedEncodingError) (after 3 attempts)"),
    (Fault("hang", seconds=3),
     {"target": {"first_token_timeout": "300ms"}, "inventory": {"poll_interval": "100ms"}},
     "ollama stopped responding: no output for 300ms after a generation of llama3 was sent"
     " (after 3 attempts)"),
], ids=["connection lost mid-stream", "no first token"])
def test_a_job_that_keeps_breaking_the_target_spends_its_attempts(
        make_foreman: Callable[..., Daemon], fake: FakeOllama,
        monkeypatch: pytest.MonkeyPatch, fault: Fault, settings: dict, error: str) -> None:
    """Regression (issue 13.2): a timeout, or a connection lost after the target accepted
    the work, was taken for an outage and requeued for free: 8 cuts gave 9 target
    requests and attempts=1.  Once the target took the work, a failure spends an
    attempt, and the job fails after max_attempts saying what happened."""
    monkeypatch.setattr("foreman.worker.retry_delay", lambda attempts: 0.05)
    daemon = make_foreman(jobs={"max_attempts": 3}, **settings)
    for _ in range(8):
        fake.fault("/api/chat", fault)
    done = wait_job(daemon, submit(daemon, "chat", CHAT).json()["id"])
    assert done["status"] == "failed" and done["attempts"] == 3
    assert done["error"] == error
    assert len(fake.requests_to("/api/chat")) == 3


def test_a_refused_connection_waits_without_spending_attempts(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(jobs={"max_attempts": 1})
    fake.stop()
    assert daemon.inventory.wait_for(lambda s: s.degraded, 5)
    job_id = submit(daemon, "chat", CHAT).json()["id"]
    fake.start()
    done = wait_job(daemon, job_id)
    assert done["status"] == "succeeded" and done["attempts"] == 1


def test_a_locked_store_at_requeue_is_retried_not_left_running(
        make_foreman: Callable[..., Daemon], fake: FakeOllama,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (issue 13.1): a requeue that met a locked store was not retried, so the
    job stayed `running` with no worker on it."""
    monkeypatch.setattr("foreman.worker.OUTAGE_RETRY_SECONDS", 0.05)
    monkeypatch.setattr("foreman.worker.retry_delay", lambda attempts: 0.05)
    daemon = make_foreman()
    store = daemon.store
    real_requeue, failures = store.requeue, []

    def locked_twice(*args: object, **kwargs: object) -> bool:
        if len(failures) < 2:
            failures.append(1)
            raise StoreUnavailable("database is locked")
        return real_requeue(*args, **kwargs)

    monkeypatch.setattr(store, "requeue", locked_twice)
    fake.fault("/api/chat", Fault("status", status=500, body=b'{"error":"runner died"}'))
    done = wait_job(daemon, submit(daemon, "chat", CHAT).json()["id"])
    assert len(failures) == 2
    assert done["status"] == "succeeded" and done["attempts"] == 2


def test_a_brief_listing_leaves_out_requests_results_and_partial_text(
        foreman: Daemon, fake: FakeOllama) -> None:
    """Regression (issue 13.11): the status page downloaded every listed job's request and
    result every 2 s (20 MB a refresh with twenty 1 MB prompts)."""
    prompt = "p" * 1_000_000
    done = wait_job(foreman, submit(foreman, "generate", {"model": "llama3",
                                                          "prompt": prompt}).json()["id"])
    fake.token_delay = 0.2
    running = submit(foreman, "chat", CHAT).json()["id"]
    assert fake.wait_for(lambda: len(fake.requests_to("/api/chat")) == 1, 5)
    full = requests.get(foreman.url + "/jobs", timeout=5)
    brief = requests.get(foreman.url + "/jobs?brief=1", timeout=5)
    assert len(full.content) > 1_000_000 > 2_000 > len(brief.content)
    by_id = {j["id"]: j for j in brief.json()["jobs"]}
    assert set(by_id) == {done["id"], running}
    for job in by_id.values():
        assert not {"request", "result", "partial"} & set(job)
        assert job["model"] in ("llama3", "llama3:latest")
    whole = {j["id"]: j for j in full.json()["jobs"]}
    assert {k: v for k, v in whole[done["id"]].items() if k not in ("request", "result")} \
        == by_id[done["id"]]
    fake.release.set()
