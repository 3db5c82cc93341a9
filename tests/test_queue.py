"""The chat slot over real sockets: one generation at a time, fair waiting, clients leaving."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import requests

from foreman.daemon import Daemon
from foreman.errors import BUSY_TEXT
from tests.fake_ollama import FakeOllama
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
    assert foreman.slot.wait_for(lambda s: s.waiting >= 3, 5)
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
    assert foreman.slot.waiting + foreman.slot.in_flight > 0
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
    assert daemon.slot.wait_for(lambda s: s.in_flight == 1, 5)
    threads += [chat_in_thread(daemon.url, results, stream=False) for _ in range(2)]
    assert daemon.slot.wait_for(lambda s: s.waiting == 2, 5)
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
    assert daemon.slot.wait_for(lambda s: s.in_flight == 1, 5)
    late = requests.post(daemon.url + "/api/chat", json=CHAT, timeout=5)
    assert late.status_code == 503 and "timed out after waiting" in late.json()["error"]
    assert int(late.headers["X-Foreman-Queue-Wait-Ms"]) >= 200
    holder.join(30)
    assert daemon.slot.waiting == 0


def test_a_waiting_client_that_leaves_frees_its_place(foreman: Daemon, fake: FakeOllama) -> None:
    fake.token_delay = 0.05
    fake.tokens = 40
    results: list[requests.Response] = []
    holder = chat_in_thread(foreman.url, results, stream=False)
    assert foreman.slot.wait_for(lambda s: s.in_flight == 1, 5)
    sock = send_only(foreman.url, "/api/chat", json.dumps(CHAT).encode())
    assert foreman.slot.wait_for(lambda s: s.waiting == 1, 5)
    sock.close()
    left = time.monotonic()
    assert foreman.slot.wait_for(lambda s: s.waiting == 0, 2)
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
    assert foreman.slot.wait_for(lambda s: s.in_flight == 0, 2)
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
    assert foreman.slot.wait_for(lambda s: s.in_flight == 0, 2)


def test_a_non_streaming_client_that_leaves_stops_the_generation(
        foreman: Daemon, fake: FakeOllama) -> None:
    fake.token_delay = 0.05
    fake.tokens = 400
    sock = send_only(foreman.url, "/api/chat", json.dumps({**CHAT, "stream": False}).encode())
    assert fake.wait_for(lambda: fake.stats.generations_active == 1, 5)
    sock.close()
    assert fake.wait_for(lambda: "/api/chat" in fake.stats.gone, 2)
    assert foreman.slot.wait_for(lambda s: s.in_flight == 0, 2)


def test_health_tags_and_embeddings_answer_while_the_queue_is_full(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(chat={"max_queue": 12})
    fake.first_token_delay = 30
    sockets = [send_only(daemon.url, "/api/chat", json.dumps(CHAT).encode())]
    assert daemon.slot.wait_for(lambda s: s.in_flight == 1, 5)
    sockets += [send_only(daemon.url, "/api/chat", json.dumps(CHAT).encode()) for _ in range(12)]
    assert daemon.slot.wait_for(lambda s: s.waiting == 12, 5)
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
    assert daemon.slot.wait_for(lambda s: s.waiting == 0 and s.in_flight == 0, 3)


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
