"""The chat slot over real sockets: one generation at a time, fair waiting, clients leaving."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import requests

from foreman.daemon import Daemon
from foreman.errors import BUSY_TEXT
from tests.fake_ollama import FakeOllama, Fault
from tests.http_raw import ChunkReader, send_only

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


def chat_in_thread(url: str, results: list[requests.Response], **body: object) -> threading.Thread:
    def run() -> None:
        results.append(requests.post(url + "/api/chat", json={**CHAT, **body}, timeout=30))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_chats_reach_the_target_one_at_a_time_while_embeddings_run_alongside(
        foreman: Daemon, fake: FakeOllama) -> None:
    fake.token_delay = 0.02
    fake.embed_delay = 0.1
    chats: list[requests.Response] = []
    threads = [chat_in_thread(foreman.url, chats, stream=False) for _ in range(6)]
    assert foreman.chat_lane.wait_for(lambda s: s.waiting >= 3, 5)
    embeds: list[requests.Response] = []

    def embed() -> None:
        embeds.append(requests.post(foreman.url + "/api/embed", timeout=30,
                                    json={"model": "nomic-embed-text", "input": "x"}))

    embedders = [threading.Thread(target=embed) for _ in range(4)]
    for t in embedders:
        t.start()
    for t in embedders:
        t.join(10)
    # All four embeddings finished while chats were still queued behind the slot.
    assert foreman.chat_lane.waiting + foreman.chat_lane.in_flight > 0
    for t in threads:
        t.join(30)
    assert [r.status_code for r in chats] == [200] * 6
    assert [r.status_code for r in embeds] == [200] * 4
    assert fake.stats.generations_peak == 1
    assert fake.stats.embeds_peak >= 2
    waits = sorted(int(r.headers["X-Foreman-Queue-Wait-Ms"]) for r in chats)
    assert waits[-1] > 0


def test_concurrency_setting_allows_that_many(make_foreman: Callable[..., Daemon],
                                              fake: FakeOllama) -> None:
    daemon = make_foreman(chat={"concurrency": 2})
    fake.token_delay = 0.02
    results: list[requests.Response] = []
    threads = [chat_in_thread(daemon.url, results, stream=False) for _ in range(6)]
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200] * 6
    assert fake.stats.generations_peak == 2


def test_queue_full_gets_ollamas_503(make_foreman: Callable[..., Daemon],
                                     fake: FakeOllama) -> None:
    daemon = make_foreman(chat={"max_queue": 2})
    fake.token_delay = 0.05
    results: list[requests.Response] = []
    threads = [chat_in_thread(daemon.url, results, stream=False)]
    assert daemon.chat_lane.wait_for(lambda s: s.in_flight == 1, 5)
    threads += [chat_in_thread(daemon.url, results, stream=False) for _ in range(2)]
    assert daemon.chat_lane.wait_for(lambda s: s.waiting == 2, 5)
    refused = requests.post(daemon.url + "/api/chat", json=CHAT, timeout=5)
    assert refused.status_code == 503
    assert refused.json() == {"error": BUSY_TEXT}
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["X-Foreman-Queue-Wait-Ms"] == "0"
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200] * 3


def test_max_wait_gives_up_with_503(make_foreman: Callable[..., Daemon],
                                    fake: FakeOllama) -> None:
    daemon = make_foreman(chat={"max_wait": "200ms"})
    fake.token_delay = 0.2
    results: list[requests.Response] = []
    holder = chat_in_thread(daemon.url, results, stream=False)
    assert daemon.chat_lane.wait_for(lambda s: s.in_flight == 1, 5)
    late = requests.post(daemon.url + "/api/chat", json=CHAT, timeout=5)
    assert late.status_code == 503 and "timed out after waiting" in late.json()["error"]
    assert int(late.headers["X-Foreman-Queue-Wait-Ms"]) >= 200
    holder.join(30)
    assert daemon.chat_lane.waiting == 0


def test_a_waiting_client_that_leaves_frees_its_place(foreman: Daemon, fake: FakeOllama) -> None:
    fake.token_delay = 0.05
    fake.tokens = 40
    results: list[requests.Response] = []
    holder = chat_in_thread(foreman.url, results, stream=False)
    assert foreman.chat_lane.wait_for(lambda s: s.in_flight == 1, 5)
    sock = send_only(foreman.url, "/api/chat", json.dumps(CHAT).encode())
    assert foreman.chat_lane.wait_for(lambda s: s.waiting == 1, 5)
    sock.close()
    left = time.monotonic()
    assert foreman.chat_lane.wait_for(lambda s: s.waiting == 0, 2)
    print(f"waiter left the line {1000 * (time.monotonic() - left):.0f} ms after hanging up")
    holder.join(30)
    assert len(fake.requests_to("/api/chat")) == 1  # the departed waiter never reached the GPU


def test_a_streaming_client_that_leaves_stops_the_generation(foreman: Daemon,
                                                             fake: FakeOllama) -> None:
    fake.token_delay = 0.05
    fake.tokens = 400
    reader = ChunkReader(foreman.url, "POST", "/api/chat", json.dumps(CHAT).encode())
    assert reader.next_chunk() is not None and reader.next_chunk() is not None
    reader.close()
    left = time.monotonic()
    assert fake.wait_for(lambda: "/api/chat" in fake.stats.gone, 2)
    print(f"target saw the hang-up {1000 * (time.monotonic() - left):.0f} ms later")
    assert foreman.chat_lane.wait_for(lambda s: s.in_flight == 0, 2)
    assert fake.stats.completed == []
    fake.tokens = 2
    after = requests.post(foreman.url + "/api/chat", json={**CHAT, "stream": False}, timeout=5)
    assert after.status_code == 200


def test_a_client_that_leaves_during_prompt_processing_cuts_the_upstream(
        foreman: Daemon, fake: FakeOllama) -> None:
    fake.first_token_delay = 10  # Ollama sends no header until the first token
    sock = send_only(foreman.url, "/api/generate", b'{"model":"llama3","prompt":"long"}')
    assert fake.wait_for(lambda: fake.stats.generations_active == 1, 5)
    sock.close()
    assert fake.wait_for(lambda: "/api/generate" in fake.stats.gone, 2)
    assert foreman.chat_lane.wait_for(lambda s: s.in_flight == 0, 2)


def test_a_non_streaming_client_that_leaves_stops_the_generation(
        foreman: Daemon, fake: FakeOllama) -> None:
    fake.token_delay = 0.05
    fake.tokens = 400
    sock = send_only(foreman.url, "/api/chat", json.dumps({**CHAT, "stream": False}).encode())
    assert fake.wait_for(lambda: fake.stats.generations_active == 1, 5)
    sock.close()
    assert fake.wait_for(lambda: "/api/chat" in fake.stats.gone, 2)
    assert foreman.chat_lane.wait_for(lambda s: s.in_flight == 0, 2)


def test_health_tags_and_embeddings_answer_while_the_queue_is_full(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(chat={"max_queue": 12})
    fake.first_token_delay = 30
    sockets = [send_only(daemon.url, "/api/chat", json.dumps(CHAT).encode())]
    assert daemon.chat_lane.wait_for(lambda s: s.in_flight == 1, 5)
    sockets += [send_only(daemon.url, "/api/chat", json.dumps(CHAT).encode()) for _ in range(12)]
    assert daemon.chat_lane.wait_for(lambda s: s.waiting == 12, 5)
    try:
        for _ in range(3):
            assert requests.get(daemon.url + "/healthz", timeout=2).json()["chat"] == {
                "in_flight": 1, "waiting": 12}
            assert requests.get(daemon.url + "/api/tags", timeout=2).status_code == 200
            embed = requests.post(daemon.url + "/api/embed", timeout=2,
                                  json={"model": "nomic-embed-text", "input": "x"})
            assert embed.status_code == 200
        assert requests.post(daemon.url + "/api/chat", json=CHAT, timeout=2).status_code == 503
    finally:
        for sock in sockets:
            sock.close()
    assert daemon.chat_lane.wait_for(lambda s: s.waiting == 0 and s.in_flight == 0, 3)


def test_embed_concurrency_bounds_the_target(make_foreman: Callable[..., Daemon],
                                             fake: FakeOllama) -> None:
    daemon = make_foreman(embed={"concurrency": 2})
    fake.embed_delay = 0.05
    results: list[int] = []

    def embed() -> None:
        results.append(requests.post(daemon.url + "/api/embed", timeout=10, json={
            "model": "nomic-embed-text", "input": "x"}).status_code)

    threads = [threading.Thread(target=embed) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200] * 8
    assert fake.stats.embeds_peak == 2


EMBED = {"model": "nomic-embed-text", "input": "x"}


def test_embed_concurrency_bounds_requests_and_jobs_together(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    """Regression (issue 13.6): embed jobs bypassed `embed.concurrency` (the target saw
    two at once with a limit of one)."""
    daemon = make_foreman(embed={"concurrency": 1})
    fake.embed_delay = 0.1
    job_ids = [requests.post(daemon.url + "/jobs", json={"kind": "embed", "request": EMBED},
                             timeout=10).json()["id"] for _ in range(3)]
    answers: list[requests.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(requests.post(
        daemon.url + "/api/embed", json=EMBED, timeout=30))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for job_id in job_ids:
        done = requests.get(f"{daemon.url}/jobs/{job_id}?wait=30", timeout=40).json()
        assert done["status"] == "succeeded"
    for thread in threads:
        thread.join(30)
    assert [a.status_code for a in answers] == [200] * 3
    assert fake.stats.embeds_peak == 1


def test_waiting_embeds_are_bounded_and_leave_when_their_client_does(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    """Regression (issue 13.6): embed waiters were unbounded; 120 of them held every
    server thread and /healthz took 7.9 s."""
    daemon = make_foreman(embed={"concurrency": 1, "max_queue": 2})
    fake.fault("/api/embed", Fault("hang", seconds=30))
    holder = send_only(daemon.url, "/api/embed", json.dumps(EMBED).encode())
    assert fake.wait_for(lambda: fake.requests_to("/api/embed") != [], 5)
    waiters = [send_only(daemon.url, "/api/embed", json.dumps(EMBED).encode())
               for _ in range(2)]
    assert daemon.embed_lane.wait_for(lambda lane: lane.waiting == 2, 5)
    refused = requests.post(daemon.url + "/api/embed", json=EMBED, timeout=5)
    assert refused.status_code == 503
    assert refused.json()["error"] == BUSY_TEXT and int(refused.headers["Retry-After"]) >= 1
    health = requests.get(daemon.url + "/healthz", timeout=5).json()
    assert health["embed"] == {"in_flight": 1, "waiting": 2}
    for sock in waiters:
        sock.close()
    assert daemon.embed_lane.wait_for(lambda lane: lane.waiting == 0, 5)
    holder.close()  # the fake notices at once, and the lane frees its place
    assert daemon.embed_lane.wait_for(lambda lane: lane.in_flight == 0, 5)
    fake.release.set()
    assert requests.post(daemon.url + "/api/embed", json=EMBED, timeout=5).status_code == 200


def test_estimates_learn_only_from_answered_generations(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    """Regression (issue 13.5): every lease release was learned, so one real 2 s sample fell
    to 0.34 s after five 400s.  Refusals, clients that left and hangs teach nothing."""
    daemon = make_foreman(target={"first_token_timeout": "300ms"})
    fake.token_delay = 0.1
    answered = requests.post(daemon.url + "/api/chat", json=CHAT, timeout=10)
    assert answered.status_code == 200 and json.loads(answered.text.splitlines()[-1])["done"]

    def history() -> dict:
        return requests.get(daemon.url + "/queue", timeout=5).json()["history"]

    learned = history()
    (model,) = learned
    assert learned[model]["samples"] == 1 and learned[model]["generation_seconds"] >= 0.4
    for _ in range(5):
        fake.fault("/api/chat", Fault("status", status=400, body=b'{"error":"bad options"}'))
        assert requests.post(daemon.url + "/api/chat", json=CHAT, timeout=10).status_code == 400
    fake.fault("/api/chat", Fault("hang", seconds=3))
    assert requests.post(daemon.url + "/api/chat", json=CHAT, timeout=10).status_code == 504
    fake.fault("/api/chat", Fault("error_after", after=1))
    requests.post(daemon.url + "/api/chat", json=CHAT, timeout=10)
    reader = ChunkReader(daemon.url, "POST", "/api/chat", json.dumps(CHAT).encode())
    reader.next_chunk()
    reader.close()  # a client that leaves mid-answer
    assert fake.wait_for(lambda: len(fake.stats.gone) == 1, 5)
    assert daemon.chat_lane.wait_for(lambda lane: lane.in_flight == 0, 5)
    # A route foreman does not know, answered: it took the slot, but for what model?
    assert requests.post(daemon.url + "/fake/future", json={}, timeout=10).status_code == 200
    assert history() == learned
