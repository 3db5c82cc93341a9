"""The inventory: cached model lists, degraded mode, re-polls on a miss, embedder warm-up."""

from __future__ import annotations

import io
import itertools
import threading
import time
from collections.abc import Callable

import pytest
import requests

from foreman.daemon import Daemon
from foreman.inventory import Inventory, canonical_model_name
from foreman.logs import configure_logging
from foreman.target import TargetClient
from tests.conftest import LogStream
from tests.fake_ollama import FakeOllama, Fault


@pytest.mark.parametrize(("a", "b"), [
    ("llama3", "llama3:latest"), ("LLaMA3:Latest", "llama3:latest"),
    ("library/llama3", "llama3"), ("registry.ollama.ai/library/llama3:latest", "llama3"),
    ("hf.co/bartowski/Qwen:Q4_K_M", "HF.CO/bartowski/qwen:q4_k_m"),
    ("localhost:5000/me/model", "localhost:5000/me/model:latest"),
])
def test_names_match_as_ollama_matches_them(a: str, b: str) -> None:
    assert canonical_model_name(a) == canonical_model_name(b)


@pytest.mark.parametrize(("a", "b"), [
    ("llama3", "llama3:8b"), ("me/llama3", "llama3"), ("llama3", "llama3.1"),
])
def test_different_names_do_not_match(a: str, b: str) -> None:
    assert canonical_model_name(a) != canonical_model_name(b)


def test_tags_and_ps_are_served_from_the_cache(make_foreman: Callable[..., Daemon],
                                               fake: FakeOllama) -> None:
    fake.loaded["llama3:latest"] = "5m"
    daemon = make_foreman(inventory={"poll_interval": "1h"})
    polls = len(fake.requests_to("/api/tags"))
    for _ in range(5):
        tags = requests.get(daemon.url + "/api/tags", timeout=5)
        ps = requests.get(daemon.url + "/api/ps", timeout=5)
        assert tags.status_code == ps.status_code == 200
    assert len(fake.requests_to("/api/tags")) == polls
    assert {m["name"] for m in tags.json()["models"]} == set(fake.models)
    assert [m["name"] for m in ps.json()["models"]] == ["llama3:latest"]
    assert ps.json()["models"][0]["size_vram"] > 0
    head = requests.head(daemon.url + "/api/tags", timeout=5)
    assert head.status_code == 200 and head.content == b""


def test_a_model_added_on_the_target_appears_after_one_poll(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(inventory={"poll_interval": "100ms"})
    fake.add_model("mistral:7b")
    assert daemon.inventory.wait_for(lambda s: "mistral:7b" in str(s.tags_body), 2)
    names = {m["name"] for m in requests.get(daemon.url + "/api/tags", timeout=5).json()["models"]}
    assert "mistral:7b" in names


def test_a_chat_for_a_model_gained_since_the_last_poll_succeeds_via_the_repoll(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(inventory={"poll_interval": "1h"})
    polls = len(fake.requests_to("/api/tags"))
    fake.add_model("qwen3:4b")
    reply = requests.post(daemon.url + "/api/chat", timeout=5,
                          json={"model": "qwen3:4b", "stream": False, "messages": []})
    assert reply.status_code == 200, reply.text
    assert reply.json()["done"] is True
    assert len(fake.requests_to("/api/tags")) == polls + 1


def test_unknown_models_get_ollamas_404_without_reaching_the_gpu(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(inventory={"poll_interval": "1h"})
    chat = requests.post(daemon.url + "/api/chat", json={"model": "nope"}, timeout=5)
    assert chat.status_code == 404 and chat.json() == {"error": "model 'nope' not found"}
    embed = requests.post(daemon.url + "/api/embed", json={"model": "nope", "input": "x"},
                          timeout=5)
    assert embed.status_code == 404
    assert embed.json() == {"error": 'model "nope" not found, try pulling it first'}
    v1 = requests.post(daemon.url + "/v1/chat/completions", json={"model": "nope"}, timeout=5)
    assert v1.status_code == 404 and v1.json()["error"]["type"] == "not_found_error"
    assert fake.requests_to("/api/chat") == fake.requests_to("/api/embed") == []


def test_target_down_means_degraded_but_still_serving_then_recovery_and_warmup(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    interval = 0.2
    daemon = make_foreman(inventory={"poll_interval": f"{interval}s"},
                          embedder={"model": "nomic-embed-text"},
                          target={"connect_timeout": "500ms"})
    assert fake.wait_for(lambda: len(fake.requests_to("/api/embed")) == 1)
    first = fake.requests_to("/api/embed")[0].json
    assert first == {"model": "nomic-embed-text", "input": [], "keep_alive": -1}
    health = requests.get(daemon.url + "/healthz", timeout=5).json()
    assert health["degraded"] is False and health["last_poll_ok_seconds_ago"] < 5

    fake.stop()
    stopped = time.monotonic()
    # One interval plus one failed poll (bounded by the connect timeout).
    assert daemon.inventory.wait_for(lambda s: s.degraded, interval + 1.0)
    print(f"degraded {time.monotonic() - stopped:.3f}s after the target stopped")
    health = requests.get(daemon.url + "/healthz", timeout=5)
    assert health.status_code == 200
    assert health.json()["degraded"] is True
    assert "cannot reach ollama" in health.json()["reason"]
    tags = requests.get(daemon.url + "/api/tags", timeout=5)
    assert tags.status_code == 200
    assert {m["name"] for m in tags.json()["models"]} == set(fake.models)
    chat = requests.post(daemon.url + "/api/chat", json={"model": "llama3"}, timeout=5)
    assert chat.status_code == 502 and "unreachable" in chat.json()["error"]

    fake.start()  # same port
    restarted = time.monotonic()
    assert daemon.inventory.wait_for(lambda s: not s.degraded, interval + 1.0)
    print(f"recovered {time.monotonic() - restarted:.3f}s after the target returned")
    assert requests.get(daemon.url + "/healthz", timeout=5).json()["degraded"] is False
    assert fake.wait_for(lambda: len(fake.requests_to("/api/embed")) == 2)
    assert fake.requests_to("/api/embed")[1].json["keep_alive"] == -1
    assert fake.loaded["nomic-embed-text:latest"] == -1


def test_tokens_the_target_token_goes_out_and_the_inbound_token_never_does(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    fake.token = "for-ollama"
    daemon = make_foreman(token="for-foreman", target={"token": "for-ollama"},
                          embedder={"model": "nomic-embed-text"})
    assert fake.wait_for(lambda: len(fake.requests_to("/api/embed")) == 1)
    auth = {"Authorization": "Bearer for-foreman", "Host": "gpu.local"}
    reply = requests.post(daemon.url + "/api/generate", headers=auth, timeout=5,
                          json={"model": "llama3", "prompt": "hi", "stream": False})
    assert reply.status_code == 200, reply.text
    assert requests.post(daemon.url + "/api/show", headers=auth, json={"model": "llama3"},
                         timeout=5).status_code == 200
    anthropic_style = {"x-api-key": "for-foreman", "anthropic-version": "2023-06-01"}
    assert requests.post(daemon.url + "/v1/messages", headers=anthropic_style, timeout=5, json={
        "model": "llama3", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
    }).status_code == 200
    with fake.cond:
        received = list(fake.received)
    assert {r.path for r in received} >= {"/api/tags", "/api/ps", "/api/embed", "/api/generate",
                                          "/api/show", "/v1/messages"}
    for r in received:
        assert r.headers["authorization"] == "Bearer for-ollama"
        assert "for-foreman" not in str(r.headers)
        assert r.headers["host"] == f"127.0.0.1:{fake.port}"


def test_a_burst_of_unknown_models_causes_a_few_polls_not_a_hundred(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(inventory={"poll_interval": "1h"})
    polls = len(fake.requests_to("/api/tags"))
    barrier = threading.Barrier(100)
    statuses: list[int] = []

    def ask(i: int) -> None:
        barrier.wait()
        reply = requests.post(daemon.url + "/api/chat", json={"model": f"ghost-{i}"}, timeout=30)
        statuses.append(reply.status_code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [404] * 100
    extra = len(fake.requests_to("/api/tags")) - polls
    print(f"100 concurrent misses caused {extra} polls")
    assert 1 <= extra <= 3


def test_misses_start_at_most_one_poll_per_cooldown(fake: FakeOllama) -> None:
    client = TargetClient(fake.url)
    inventory = Inventory(client, poll_interval=3600, miss_cooldown=0.3)
    inventory.refresh()
    before = len(fake.requests_to("/api/tags"))
    for name in ("a", "b", "c"):
        assert inventory.known_absent(name)
    stamps = [r.at for r in fake.requests_to("/api/tags")][before:]
    assert len(stamps) == 3
    assert all(later - earlier >= 0.29 for earlier, later in itertools.pairwise(stamps))
    client.close()


@pytest.mark.parametrize(("fault", "logged"), [
    (Fault("garbage"), "GET /api/tags with a body that is not JSON"),
    (Fault("status", status=500, body=b'{"error":"llama runner crashed"}'),
     "GET /api/tags with 500: llama runner crashed"),
    (Fault("status", status=200, body=b'{"models": "not a list"}'),
     "GET /api/tags with JSON of an unexpected shape"),
    (Fault("status", status=200, body=b"[1, 2, 3]"),
     "GET /api/tags with JSON of an unexpected shape"),
])
def test_garbage_from_the_target_is_an_error_not_a_dead_poller(fake: FakeOllama, fault: Fault,
                                                              logged: str) -> None:
    stream = LogStream()
    configure_logging("info", "text", stream)
    client = TargetClient(fake.url)
    inventory = Inventory(client, poll_interval=0.05)
    try:
        inventory.refresh()
        fake.fault("/api/tags", fault)
        inventory.start()
        assert inventory.wait_for(lambda s: s.degraded, 2)
        assert stream.wait_for("target degraded")
        line = next(x for x in stream.getvalue().splitlines() if "target degraded" in x)
        assert logged in line
        assert inventory.snapshot.known  # the last good models are kept
        assert inventory.wait_for(lambda s: not s.degraded, 2)  # the poller lives on
    finally:
        inventory.stop()
        client.close()
        configure_logging("info", "text", io.StringIO())
